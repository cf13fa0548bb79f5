"""What a model is, as plain data: the spec every checkpoint stores and :func:`build_model` rebuilds from.

A :class:`ModelSpec` names the kind ("simclr": encoder + projection head, optionally the online
probe; "classifier": encoder + the head up to ``head_layer`` + a linear classifier), the encoder
(docs/method.md §1: depth, width, selective kernels, stem, average-pool shortcuts, input
channels), the head (docs/method.md §2), and the images it was trained on (``image_size``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from simclrv2.models.resnet import STEM_TYPES, sk_options

KINDS = ("simclr", "classifier")


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "simclr" | "classifier"
    depth: int
    width: float  # width multiplier
    in_channels: int
    selective_kernel: bool = False  # SK convolutions in the bottleneck blocks
    stem_type: str = "default"  # "default" (7x7/2 conv + max-pool) | "deep" (ResNet-D) | "small" (3x3/1, no pool)
    avg_down: bool = False  # ResNet-D projection shortcuts: average pool, then a stride-1 1x1 conv
    head_layers: int = 3  # projection head layers (simclr: all of them; classifier: how many the pretrained head had)
    proj_dim: int = 128
    num_classes: int | None = None  # classifier: its classes; simclr: the online probe's (None: no probe)
    head_layer: int = 0  # classifier: the head layers it keeps before its fc
    probe_norm: bool = False  # simclr: the probe reads the features through an affine-free BatchNorm
    feature_norm: bool = False  # classifier: the fc reads the features through an affine-free BatchNorm (linear-eval)
    image_size: int | None = None  # the side of the (square) images it was trained on

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not supported; expected one of {', '.join(KINDS)}")
        if self.stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type {self.stem_type!r} is not supported; expected one of {', '.join(STEM_TYPES)}")

    @property
    def small_images(self) -> bool:
        return self.stem_type == "small"

    def encoder_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`simclrv2.models.build_resnet`."""
        return dict(depth=self.depth, width_multiplier=self.width, selective_kernel=self.selective_kernel,
                    stem_type=self.stem_type, avg_down=self.avg_down, in_channels=self.in_channels)

    def same_encoder(self, other: ModelSpec) -> bool:
        """Whether ``other``'s encoder has this one's architecture (its weights fit)."""
        return self.encoder_options() == other.encoder_options()

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, image_size: int | None = None, version: int = 2) -> ModelSpec:
        """The spec of a checkpoint's ``"model"`` entry; ValueError when it is not one.

        Format 1 had one flag ``sk`` for selective kernels, the ResNet-D stem and average-pool
        shortcuts together, a ``small_images`` flag for the small-image stem, and the image size
        beside the spec (``image_size``)."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        data = dict(data)
        if version == 1:
            sk, small = data.pop("sk", False), data.pop("small_images", False)
            if not isinstance(sk, bool) or not isinstance(small, bool):
                raise ValueError("sk and small_images must be true or false")
            data.update(sk_options(sk, small))
            data.setdefault("image_size", image_size)
            data.setdefault("head_layer", 0)
            if data["head_layer"] is None:  # import-tf of a simclr model
                data["head_layer"] = 0
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}")
        missing = [n for n in ("kind", "depth", "width", "in_channels") if n not in data]
        if missing:
            raise ValueError(f"missing {missing[0]!r}")
        _check_types(data)
        return cls(**data)


def _check_types(data: dict[str, Any]) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {"kind": lambda v: isinstance(v, str), "depth": is_int, "in_channels": is_int, "head_layers": is_int,
              "proj_dim": is_int, "head_layer": is_int,
              "width": lambda v: (is_int(v) or isinstance(v, float)) and v > 0,
              "selective_kernel": lambda v: isinstance(v, bool), "avg_down": lambda v: isinstance(v, bool),
              "probe_norm": lambda v: isinstance(v, bool), "feature_norm": lambda v: isinstance(v, bool),
              "stem_type": lambda v: isinstance(v, str),
              "num_classes": lambda v: v is None or is_int(v), "image_size": lambda v: v is None or is_int(v)}
    for name, ok in checks.items():
        if name in data and not ok(data[name]):
            raise ValueError(f"{name} has the invalid value {data[name]!r}")


def model_spec(kind: str, *, depth: int, width: float, sk: bool, small_images: bool, in_channels: int,
               head_layers: int = 3, proj_dim: int = 128, num_classes: int | None = None, head_layer: int = 0,
               probe_norm: bool = False, image_size: int | None = None) -> ModelSpec:
    """A :class:`ModelSpec` from the presets' options: ``sk`` sets selective kernels, the ResNet-D
    stem and average-pool shortcuts together; ``small_images`` picks the small-image stem."""
    return ModelSpec(kind, depth, width, in_channels, **sk_options(sk, small_images),
                     head_layers=head_layers, proj_dim=proj_dim, num_classes=num_classes, head_layer=head_layer,
                     probe_norm=probe_norm, image_size=image_size)
