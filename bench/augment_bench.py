"""Throughput of the pretraining augmentation: own batched tensor ops vs an equivalent kornia pipeline.

Usage: ``python bench/augment_bench.py [--quick] [--json]`` (``PYTHONPATH=src`` when the
package is not installed).  ``run(quick) -> dict`` is the entry point for ``bench/run.py``.

One pretraining view per image, on the CPU with ``torch.set_num_threads(2)``, starting from a
uint8 batch (the uint8 -> float conversion is timed for both):

* ``fmnist28``: 28 px, 1 channel, batch 512, colour strength 0.5, no blur;
* ``cifar32``: 32 px, 3 channels, batch 512, colour strength 0.5, no blur;
* ``imagenet224``: 256 px inputs -> 224 px views, 3 channels, batch 64, strength 1.0, blur on.

The kornia pipeline is RandomResizedCrop -> RandomHorizontalFlip -> ColorJitter(p=0.8) ->
RandomGrayscale(p=0.2) [-> RandomGaussianBlur(p=0.5)], with the same ranges (1 channel:
brightness + contrast only, no grayscale); both of kornia's cropping modes ("slice", "resample")
are timed and the faster (by median) is reported.  Images/s is reported from the best (minimum)
and the median time of the timed repetitions; on a shared machine the best repetition is the
more reproducible figure.  The repetitions of own and kornia are interleaved so that
background load hits both alike, and the 1-minute load average before/after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

try:
    from simclrv2.data.augment import PretrainAugment, blur_kernel_size
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from simclrv2.data.augment import PretrainAugment, blur_kernel_size

CONFIGS = {
    # name: (channels, input side, output side, batch, colour strength, blur)
    "fmnist28": (1, 28, 28, 512, 0.5, False),
    "cifar32": (3, 32, 32, 512, 0.5, False),
    "imagenet224": (3, 256, 224, 64, 1.0, True),
}


def _kornia_pipeline(channels: int, size: int, strength: float, blur: bool, cropping_mode: str):
    import kornia.augmentation as K

    s = strength
    ops = [
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), cropping_mode=cropping_mode),
        K.RandomHorizontalFlip(p=0.5),
    ]
    if channels == 3:
        ops.append(K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8))
        ops.append(K.RandomGrayscale(p=0.2))
    else:
        ops.append(K.ColorJitter(0.8 * s, 0.8 * s, 0.0, 0.0, p=0.8))
    if blur:
        ops.append(K.RandomGaussianBlur(blur_kernel_size(size), (0.1, 2.0), p=0.5))
    return K.AugmentationSequential(*ops)


def _time_interleaved(fns: dict, reps: int, warmup: int) -> dict:
    """Median and best seconds per call of each function, the repetitions interleaved.

    Interleaving (own, kornia, own, kornia, ...) exposes all candidates to the same background
    load, which keeps the ratio meaningful on a shared machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def run(quick: bool = False, threads: int = 2, configs: list[str] | None = None, with_kornia: bool = True) -> dict:
    """Time own vs kornia for each config (all by default); returns a JSON-serialisable dict.

    ``with_kornia=False``: own only (no kornia import; the kornia keys are absent)."""
    torch.set_num_threads(threads)
    reps, warmup = (3, 1) if quick else (15, 2)
    if with_kornia:
        import kornia

    load_before = os.getloadavg()[0]
    results = {}
    for name in configs or list(CONFIGS):
        channels, side, size, batch, strength, blur = CONFIGS[name]
        torch.manual_seed(0)
        images = torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8)
        own = PretrainAugment(size, color_strength=strength, blur=blur)
        gen = torch.Generator().manual_seed(0)
        fns = {"own": lambda: own(images, gen)}
        if with_kornia:
            pipes = {mode: _kornia_pipeline(channels, size, strength, blur, mode) for mode in ("slice", "resample")}
            fns["kornia_slice"] = lambda: pipes["slice"](images.float().div_(255.0))
            fns["kornia_resample"] = lambda: pipes["resample"](images.float().div_(255.0))
        with torch.no_grad():
            t = _time_interleaved(fns, reps, warmup)
        own_med, own_best = t["own"]
        results[name] = {
            "channels": channels,
            "input_size": side,
            "image_size": size,
            "batch": batch,
            "color_strength": strength,
            "blur": blur,
            "own_images_per_s": batch / own_med,
            "own_images_per_s_best": batch / own_best,
        }
        if not with_kornia:
            continue
        k_mode = min(("slice", "resample"), key=lambda m: t["kornia_" + m][0])
        k_med, k_best = t["kornia_" + k_mode]
        results[name].update({
            "kornia_images_per_s": batch / k_med,
            "kornia_images_per_s_best": batch / k_best,
            "kornia_cropping_mode": k_mode,
            "kornia_other_mode_images_per_s": batch / t["kornia_" + ("resample" if k_mode == "slice" else "slice")][0],
            "own_over_kornia": k_med / own_med,
            "own_over_kornia_best": k_best / own_best,
        })
    return {
        "benchmark": "augment",
        "torch": torch.__version__,
        "kornia": kornia.__version__ if with_kornia else None,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "reps": reps,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "results": results,
    }


def _table(out: dict) -> str:
    lines = [
        "| config | batch | own, img/s best (median) | kornia, img/s best (median) | own / kornia, best (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in out["results"].items():
        lines.append(
            f"| {name} ({r['channels']}ch, {r['input_size']}->{r['image_size']} px"
            f"{', blur' if r['blur'] else ''}) | {r['batch']} | {r['own_images_per_s_best']:,.0f} "
            f"({r['own_images_per_s']:,.0f}) | {r['kornia_images_per_s_best']:,.0f} "
            f"({r['kornia_images_per_s']:,.0f}, {r['kornia_cropping_mode']}) | "
            f"{r['own_over_kornia_best']:.1f}x ({r['own_over_kornia']:.1f}x) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--config", action="append", choices=list(CONFIGS), help="only this config (repeatable)")
    args = parser.parse_args(argv)
    out = run(quick=args.quick, threads=args.threads, configs=args.config)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"torch {out['torch']}, kornia {out['kornia']}, {out['threads']} threads, {out['reps']} reps, "
            f"load average {out['loadavg_1min_before']:.2f} -> {out['loadavg_1min_after']:.2f}"
        )
        print(_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
