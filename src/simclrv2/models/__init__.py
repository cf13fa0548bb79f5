"""Encoders (ResNet/SK), projection head, pretraining and classification models."""

from simclrv2.models.factory import build_model, count_params, model_spec
from simclrv2.models.head import Classifier, ProjectionHead, SimCLRModel
from simclrv2.models.resnet import (
    ResNet, build_resnet, resnet18, resnet50, resnet101, resnet152, set_activation_checkpointing,
)

__all__ = [
    "Classifier",
    "ProjectionHead",
    "ResNet",
    "SimCLRModel",
    "build_model",
    "build_resnet",
    "count_params",
    "model_spec",
    "resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
    "set_activation_checkpointing",
]
