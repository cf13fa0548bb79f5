"""Rebuild any model from the plain-data spec stored in a checkpoint's JSON."""

from __future__ import annotations

from torch import nn

from simclrv2.errors import CheckpointError
from simclrv2.models.head import Classifier, ProjectionHead, SimCLRModel
from simclrv2.models.resnet import build_resnet, sk_options

SPEC_KEYS = ("kind", "depth", "width", "sk", "small_images", "in_channels", "head_layers", "proj_dim", "num_classes", "head_layer", "probe_norm")


def model_spec(kind: str, *, depth: int, width: float, sk: bool, small_images: bool, in_channels: int,
               head_layers: int = 3, proj_dim: int = 128, num_classes: int | None = None, head_layer: int = 0,
               probe_norm: bool = False) -> dict:
    spec = dict(kind=kind, depth=depth, width=width, sk=sk, small_images=small_images, in_channels=in_channels,
                head_layers=head_layers, proj_dim=proj_dim, num_classes=num_classes, head_layer=head_layer)
    if probe_norm:
        spec["probe_norm"] = True
    return spec


def build_model(spec: dict) -> nn.Module:
    """``kind='simclr'``: SimCLRModel (with an online probe when num_classes is set);
    ``kind='classifier'``: Classifier keeping ``head_layer`` of ``head_layers`` head layers."""
    try:
        encoder = build_resnet(spec["depth"], spec["width"], in_channels=spec["in_channels"],
                               **sk_options(spec["sk"], spec["small_images"]))
        if spec["kind"] == "simclr":
            return SimCLRModel(encoder, spec["head_layers"], spec["proj_dim"], probe_classes=spec.get("num_classes"),
                                probe_norm=bool(spec.get("probe_norm", False)))
        if spec["kind"] == "classifier":
            head = ProjectionHead(encoder.out_dim, spec["head_layers"], spec["proj_dim"]).truncated(spec["head_layer"])
            return Classifier(encoder, spec["num_classes"], head)
    except KeyError as e:
        raise CheckpointError(f"model spec is missing {e}") from None
    raise CheckpointError(f"unknown model kind {spec.get('kind')!r}; expected 'simclr' or 'classifier'")


def count_params(model: nn.Module, exclude_prefixes: tuple[str, ...] = ("probe.",)) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude_prefixes))
