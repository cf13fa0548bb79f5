"""Build any model from its :class:`~simclrv2.models.spec.ModelSpec` (what a checkpoint stores)."""

from __future__ import annotations

from torch import nn

from simclrv2.models.head import Classifier, ProjectionHead, SimCLRModel
from simclrv2.models.resnet import build_resnet
from simclrv2.models.spec import ModelSpec


def build_model(spec: ModelSpec) -> nn.Module:
    """``kind='simclr'``: SimCLRModel (with an online probe when num_classes is set);
    ``kind='classifier'``: Classifier keeping ``head_layer`` of ``head_layers`` head layers."""
    encoder = build_resnet(**spec.encoder_options())
    if spec.kind == "simclr":
        return SimCLRModel(encoder, spec.head_layers, spec.proj_dim, probe_classes=spec.num_classes,
                           probe_norm=spec.probe_norm)
    head = ProjectionHead(encoder.out_dim, spec.head_layers, spec.proj_dim).truncated(spec.head_layer)
    return Classifier(encoder, spec.num_classes, head, feature_norm=spec.feature_norm)


def count_params(model: nn.Module, exclude_prefixes: tuple[str, ...] = ("probe.",)) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude_prefixes))
