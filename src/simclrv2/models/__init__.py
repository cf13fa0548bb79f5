"""Encoders (ResNet/SK), projection head, pretraining and classification models."""

from simclrv2.models.factory import build_model, count_params
from simclrv2.models.head import Classifier, ProjectionHead, SimCLRModel
from simclrv2.models.resnet import (ResNet, build_resnet, frozen_batchnorm_statistics, set_activation_checkpointing,
                                    sk_options)
from simclrv2.models.spec import ModelSpec, model_spec

__all__ = [
    "Classifier",
    "ModelSpec",
    "ProjectionHead",
    "ResNet",
    "SimCLRModel",
    "build_model",
    "build_resnet",
    "count_params",
    "frozen_batchnorm_statistics",
    "model_spec",
    "set_activation_checkpointing",
    "sk_options",
]
