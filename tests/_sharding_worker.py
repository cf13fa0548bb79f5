"""Runs under ``torchrun --nproc_per_node 2`` for tests/test_sharding.py (not a test module itself).

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_sharding_worker.py ROOT OUT``

1. The image check of the image folder ROOT's train split, in rounds of 3 images per process:
   OUT/check.<rank>.json holds the unreadable images each process returned and its own counts.
2. Predictions of a fixed model over ROOT's test split (on disk, one decode worker) and over the
   digits test split (in memory), each process computing its share: OUT/<name>.<rank>.npy.
3. One training step of a small conv net with global BatchNorm under DDP, eager and through
   ``torch.compile`` (``--compile`` with DDP + global BN): OUT/compile.<rank>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def model():
    from simclrv2.models import build_model, model_spec

    torch.manual_seed(0)
    spec = model_spec("classifier", depth=18, width=0.125, sk=False, small_images=True, in_channels=3,
                      head_layers=0, num_classes=3)
    return build_model(spec).eval()


def rgb_to_gray_model():
    """The same model for 1-channel digits: the first convolution summed over its input channels."""
    from simclrv2.models import build_model, model_spec

    m = model()
    spec = model_spec("classifier", depth=18, width=0.125, sk=False, small_images=True, in_channels=1,
                      head_layers=0, num_classes=3)
    g = build_model(spec)
    state = m.state_dict()
    state["encoder.conv1.weight"] = state["encoder.conv1.weight"].sum(1, keepdim=True)
    g.load_state_dict(state)
    return g.eval()


def predictions(rt):
    from simclrv2.data import ImageFolderDataset, load_dataset
    from simclrv2.data.augment import EvalTransform
    from simclrv2.engine import predict

    root = Path(sys.argv[1])
    folder = ImageFolderDataset(root, "test", 16)
    digits = load_dataset("digits", "test")
    return {
        "folder": predict(model(), folder, rt, EvalTransform(16), batch_size=4, workers=1),
        "digits": predict(rgb_to_gray_model(), digits, rt, EvalTransform(8), batch_size=50),
    }


class TinyNet(torch.nn.Module):
    """conv -> BN -> ReLU -> pool -> linear: compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def compiled_ddp_step(rt) -> dict:
    """Loss and gradients of one DDP step with global BN, eager vs compiled: their largest differences."""
    from simclrv2.distributed import wrap_model

    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = TinyNet()
        net = wrap_model(model, rt, sync_bn=True, compile=compiled)
        x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(rt.rank))  # this rank's rows
        loss = net(x).square().mean()
        loss.backward()
        runs[compiled] = (loss.item(), [p.grad.clone() for p in model.parameters()], model.bn.running_var.clone())
    (l0, g0, v0), (l1, g1, v1) = runs[False], runs[True]
    return {"loss": l0, "loss_diff": abs(l0 - l1), "grad_diff": max((a - b).abs().max().item() for a, b in zip(g0, g1)),
            "grad_scale": max(a.abs().max().item() for a in g0), "running_var_diff": (v0 - v1).abs().max().item()}


def main() -> None:
    from simclrv2.data import ImageFolderDataset, image_check
    from simclrv2.runtime import init_runtime

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    rt = init_runtime("cpu", "fp32")
    assert rt.world_size == 2, "run me with torchrun --nproc_per_node 2"
    out.mkdir(parents=True, exist_ok=True)
    image_check.ROUND_PER_WORKER = 3
    bad, counts = image_check.unreadable_images(ImageFolderDataset(root, "train", 16), workers=0)
    (out / f"check.{rt.rank}.json").write_text(json.dumps({"bad": bad, "counts": counts}))
    for name, (outputs, labels) in predictions(rt).items():
        np.save(out / f"{name}.{rt.rank}.npy", outputs.numpy())
        np.save(out / f"{name}_labels.{rt.rank}.npy", labels.numpy())
    (out / f"compile.{rt.rank}.json").write_text(json.dumps(compiled_ddp_step(rt)))
    # every rank done with every collective before any tears its process group down (the library's exit,
    # as the CLI's): a rank that exits while its peer still talks to it can abort in gloo
    from simclrv2 import distributed

    distributed.shutdown()
    assert not torch.distributed.is_initialized()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are written; skip interpreter teardown (where the abort was seen)


if __name__ == "__main__":
    main()
