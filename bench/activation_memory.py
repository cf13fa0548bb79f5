"""Training memory of the ResNet encoders per image, with and without activation checkpointing.

Usage: ``PYTHONPATH=src python bench/activation_memory.py [--json] [--models r50_1x ...] [--image-size 224]``
(about 15 minutes on a shared 2-core CPU for all models, most of it ResNet-152 3x SK; ``--quick``:
ResNet-50 1x only, seconds).

Method: one training forward + backward of the encoder (loss: mean of the features squared) on
random 224 px images, on the CPU, fp32 or under bf16 autocast, with activation checkpointing off,
per stage or per block (:func:`simclrv2.models.resnet.set_activation_checkpointing`). A
``TorchDispatchMode`` sees every tensor that an operator creates, forward, backward and
recomputation alike; it counts each new storage's bytes while the storage lives (a weakref
finaliser subtracts them), which is what a device allocator holds, minus its rounding, caching
and the kernels' workspaces. Two numbers per run:

* ``saved``: bytes alive right after the forward pass (the input, what autograd keeps for
  backward, the output, under autocast the bf16 weight copies);
* ``peak``: the most bytes alive at any time during forward + backward (recomputed segments,
  gradient buffers and the parameters' gradients included).

Run at two batch sizes (2 and 4 images), the operators are the same and run in the same order,
so the bytes alive after each operator are a line in the batch size, ``c(t) + a(t)·B``: ``a(t)``
is what grows per image (activations), ``c(t)`` what does not (parameter gradients, bf16 weight
copies). The peak of a batch of B images is ``max_t c(t) + a(t)·B``; "peak per image" is
``max_t a(t)``, the slope of that peak for large batches (at B = 2 the peak can fall at a later
point, where more gradients exist and fewer activations). The weights and the optimiser's
momentum exist before the measurement starts and are not counted; the extrapolation adds them.

The extrapolation (README, "Memory at the paper's scale"): the largest batch whose predicted peak
plus the weights and LARS momentum (8 bytes per parameter) fits in 90% of a 40 / 80 GiB GPU; the
10% margin for the CUDA context, cuDNN workspaces and allocator fragmentation is an assumption,
not a measurement. Pretraining runs 2 views of each image through the encoder, so a global batch
of 4096 images is 8192 encoder inputs: GPUs needed = ceil(8192 / inputs per GPU). The projection
head, the loss and the augmentation are left out (a few KiB per image against tens of MiB).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import simclrv2  # noqa: F401
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, os.path.join(HERE, "..", "src"))

from simclrv2.models.resnet import build_resnet, set_activation_checkpointing, sk_options  # noqa: E402

GiB = 2**30
MiB = 2**20
MODELS = {  # name: (depth, width, selective kernels), the paper's configurations
    "r50_1x": (50, 1.0, False),
    "r50_2x_sk": (50, 2.0, True),
    "r101_1x": (101, 1.0, False),
    "r152_3x_sk": (152, 3.0, True),
}
MODES = {"off": None, "stage": "stage", "block": "block"}
PRECISIONS = ("fp32", "bf16")
BATCHES = (2, 4)  # images per measurement; BN of the SK attention needs > 1 row
GPU_GIB = (40, 80)
GLOBAL_IMAGES = 4096
VIEWS = 2  # pretraining: two views of every image go through the encoder
MARGIN = 0.9  # usable fraction of a GPU's memory (assumed)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by operators while active and still alive; ``peak``: the most at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.timeline: list[int] = []  # bytes alive after each operator

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the storage itself: views and in-place results are not new memory
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        self.timeline.append(self.current)
        return out


def measure(model: torch.nn.Module, batch: int, image_size: int, precision: str, mode: str | None) -> dict:
    """``saved`` and ``peak`` bytes (see the module docstring) of one training forward + backward,
    and the ``timeline`` of bytes alive after each operator."""
    set_activation_checkpointing(model, mode)
    model.train()
    model.zero_grad(set_to_none=True)
    gc.collect()
    with LiveTensorBytes() as live:
        x = torch.randn(batch, 3, image_size, image_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        saved = live.current
        out.float().pow(2).mean().backward()
        del out, x
    model.zero_grad(set_to_none=True)
    return {"saved": saved, "peak": live.peak, "timeline": live.timeline}


def per_image(small: dict, large: dict) -> dict[str, float]:
    """(constant, per-image) bytes: of what is alive after the forward, and of the peak (``max_t a(t)``,
    with the constant ``c(t)`` of that operator)."""
    n = BATCHES[1] - BATCHES[0]
    if len(small["timeline"]) != len(large["timeline"]):
        raise RuntimeError("the two batch sizes ran different operators; the memory is not linear in the batch")
    slopes = [(b - a) / n for a, b in zip(small["timeline"], large["timeline"])]
    t = max(range(len(slopes)), key=slopes.__getitem__)
    saved = (large["saved"] - small["saved"]) / n
    return {"saved": saved, "peak": slopes[t], "peak_constant": small["timeline"][t] - slopes[t] * BATCHES[0]}


def predicted_peak(small: dict, large: dict, images: int) -> float:
    """``max_t c(t) + a(t)·images``: the bytes alive at the worst moment of a batch of ``images``."""
    n = BATCHES[1] - BATCHES[0]
    return max(a + (b - a) / n * (images - BATCHES[0]) for a, b in zip(small["timeline"], large["timeline"]))


def state_bytes(params: int, precision: str) -> int:
    """Weights + gradients + LARS momentum (fp32), + the bf16 weight copies of autocast."""
    return params * (12 + (2 if precision == "bf16" else 0))


def extrapolate(small: dict, large: dict, params: int) -> dict:
    """Encoder inputs per GPU of 40 / 80 GiB, and GPUs for a pretraining batch of 4096 images: the
    largest batch whose predicted peak (:func:`predicted_peak`, with the parameters' gradients and
    bf16 copies) + weights + momentum (8 bytes per parameter, not measured) fits in MARGIN of it."""
    out = {}
    for gib in GPU_GIB:
        budget = MARGIN * gib * GiB - 8 * params
        lo, hi = 0, 1
        while predicted_peak(small, large, hi) <= budget:  # exponential then binary search
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if predicted_peak(small, large, mid) <= budget else (lo, mid)
        inputs = lo
        out[f"inputs_per_{gib}gb"] = inputs
        out[f"gpus_for_{GLOBAL_IMAGES}_{gib}gb"] = math.ceil(GLOBAL_IMAGES * VIEWS / inputs) if inputs else None
    return out


def run(models: list[str], image_size: int, modes: list[str], precisions: list[str]) -> list[dict]:
    rows = []
    for name in models:
        depth, width, sk = MODELS[name]
        torch.manual_seed(0)
        model = build_resnet(depth, width, **sk_options(sk))
        params = sum(p.numel() for p in model.parameters())
        for precision in precisions:
            for mode in modes:
                t0 = time.perf_counter()
                small, large = (measure(model, b, image_size, precision, MODES[mode]) for b in BATCHES)
                per = per_image(small, large)
                row = {"model": name, "depth": depth, "width": width, "sk": sk, "params": params, "image_size": image_size,
                       "precision": precision, "checkpointing": mode, "batches": list(BATCHES),
                       "saved_bytes": [small["saved"], large["saved"]], "peak_bytes": [small["peak"], large["peak"]],
                       "saved_per_image_mib": per["saved"] / MiB, "peak_per_image_mib": per["peak"] / MiB,
                       "peak_constant_gib": per["peak_constant"] / GiB,
                       "state_gib": state_bytes(params, precision) / GiB, "seconds": time.perf_counter() - t0}
                row.update(extrapolate(small, large, params))
                rows.append(row)
                print(f"{name} {precision} {mode}: {row['peak_per_image_mib']:.1f} MiB/image peak, "
                      f"{row['saved_per_image_mib']:.1f} saved ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
        del model
        gc.collect()
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | params | precision | checkpointing | saved MiB/image | peak MiB/image | images/GPU 40 GB | "
          "images/GPU 80 GB | GPUs for 4096 (80 GB) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        def images(gib):  # pretraining images: two encoder inputs each
            return r[f"inputs_per_{gib}gb"] // VIEWS

        print(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['precision']} | {r['checkpointing']} | "
              f"{r['saved_per_image_mib']:.1f} | {r['peak_per_image_mib']:.1f} | {images(40)} | {images(80)} | "
              f"{r[f'gpus_for_{GLOBAL_IMAGES}_80gb'] or '-'} |")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="ResNet-50 1x only")
    parser.add_argument("--json", action="store_true", help="also print the rows as one JSON object on the last line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = ["r50_1x"] if args.quick else args.models
    rows = run(models, args.image_size, args.modes, args.precisions)
    print(f"torch {torch.__version__}, CPU {cpu_name()}, {args.image_size} px, batches {BATCHES}; images per GPU and "
          f"GPU counts: pretraining (2 views per image), {MARGIN:.0%} of the GPU's memory usable")
    print_table(rows)
    if args.json:
        print(json.dumps({"benchmark": "activation_memory", "torch": torch.__version__, "cpu": cpu_name(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
