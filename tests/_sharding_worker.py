"""Runs under ``torchrun --nproc_per_node 2`` for tests/test_sharding.py (not a test module itself).

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_sharding_worker.py ROOT OUT``

1. The image check of the image folder ROOT's train split, in rounds of 3 images per process:
   OUT/check.<rank>.json holds the unreadable images each process returned and its own counts.
2. Predictions of a fixed model over ROOT's test split (on disk, one decode worker) and over the
   digits test split (in memory), each process computing its share: OUT/<name>.<rank>.npy.
"""

from __future__ import annotations

import json
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
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
