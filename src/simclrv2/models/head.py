"""Projection head, pretraining model and fine-tuning classifier (docs/method.md §2).

Head layer j: Linear (no bias) -> BN. Hidden layers keep the input width, use a BN shift and a
ReLU; the last layer outputs ``out_dim`` (128) through a BN with a scale but no shift.
"Layer k" of the head means the output after k head layers; layer 0 is the encoder's output.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from simclrv2.models.resnet import BN_EPS, BN_MOMENTUM


class BatchNorm1dNoShift(nn.BatchNorm1d):
    """BN with a learned scale (gamma) and no shift (beta): TF's ``center=False``."""

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.register_parameter("bias", None)


class HeadLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, last: bool):
        super().__init__()
        self.last = last
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = BatchNorm1dNoShift(out_dim) if last else nn.BatchNorm1d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.linear(x))
        return x if self.last else torch.relu(x)


class ProjectionHead(nn.Module):
    """``num_layers`` (0-4) head layers; ``forward`` returns the projection, ``hiddens`` every layer's output."""

    def __init__(self, in_dim: int, num_layers: int = 3, out_dim: int = 128):
        super().__init__()
        if not 0 <= num_layers <= 4:
            raise ValueError(f"ProjectionHead: num_layers {num_layers} is not supported; expected 0 to 4")
        self.in_dim = in_dim
        self.layers = nn.ModuleList(
            HeadLayer(in_dim, out_dim if j == num_layers - 1 else in_dim, last=j == num_layers - 1)
            for j in range(num_layers)
        )
        self.out_dim = out_dim if num_layers else in_dim

    def hiddens(self, h: torch.Tensor) -> list[torch.Tensor]:
        """[layer 0 (= input), layer 1, ..., projection]."""
        out = [h]
        for layer in self.layers:
            out.append(layer(out[-1]))
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h

    def truncated(self, k: int) -> ProjectionHead:
        """A copy of the first ``k`` layers (the part fine-tuning keeps)."""
        if not 0 <= k <= len(self.layers):
            raise ValueError(f"ProjectionHead.truncated: k={k} is not available; the head has {len(self.layers)} layers (0 to {len(self.layers)})")
        head = copy.deepcopy(self)
        head.layers = head.layers[:k]
        head.out_dim = head.layers[-1].linear.out_features if k else self.in_dim
        return head


class SimCLRModel(nn.Module):
    """Encoder + projection head: images -> (features h, projections z).

    ``probe_classes``: also hold an online linear probe (``probe``) for monitoring; it is trained
    on stop-gradient features by the pretraining stage and is not part of the forward pass.
    ``probe_norm``: the probe reads the features through a BatchNorm without affine parameters
    (``probe_bn``, as MAE's linear probe), so that its learning rate does not depend on the
    features' scale; off, it reads raw features, as the official head_supervised (TF import).
    """

    def __init__(self, encoder: nn.Module, head_layers: int = 3, proj_dim: int = 128, probe_classes: int | None = None,
                 probe_norm: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.out_dim, head_layers, proj_dim)
        self.probe = nn.Linear(encoder.out_dim, probe_classes) if probe_classes else None
        self.probe_bn = nn.BatchNorm1d(encoder.out_dim, affine=False) if probe_classes and probe_norm else None

    def forward(self, x: torch.Tensor, probe: bool = False):
        """(h, z); with ``probe=True`` also the probe's logits on stop-gradient h (None without a probe)."""
        h = self.encoder(x)
        z = self.head(h)
        if not probe:
            return h, z
        if self.probe is None:
            return h, z, None
        f = h.detach()
        return h, z, self.probe(self.probe_bn(f) if self.probe_bn is not None else f)


class Classifier(nn.Module):
    """Encoder + the head up to layer k + a linear classifier: images -> logits.

    With ``head_layers=0`` it is the plain encoder + linear layer (supervised baseline, students,
    SimCLR v1-style fine-tuning). ``feature_norm``: the fc reads the features through a BatchNorm
    without affine parameters (``feature_norm``, as the pretraining probe's ``probe_bn``): linear
    evaluation of frozen features whose scale would make its learning rate unstable.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, head: ProjectionHead | None = None, zero_init: bool = False,
                 feature_norm: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else ProjectionHead(encoder.out_dim, 0)
        self.feature_norm = (nn.BatchNorm1d(self.head.out_dim, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False)
                             if feature_norm else None)
        self.fc = nn.Linear(self.head.out_dim, num_classes)
        if zero_init:  # the official fine-tuning starts from zero logits
            nn.init.zeros_(self.fc.weight)
        else:
            nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @property
    def head_layer(self) -> int:
        return len(self.head.layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.fc(self.feature_norm(f) if self.feature_norm is not None else f)

    @classmethod
    def from_pretrained(cls, model: SimCLRModel, num_classes: int, head_layer: int, feature_norm: bool = False) -> Classifier:
        """Fine-tuning model: a copy of the pretrained encoder and its head up to ``head_layer``."""
        return cls(copy.deepcopy(model.encoder), num_classes, model.head.truncated(head_layer), zero_init=True,
                   feature_norm=feature_norm)
