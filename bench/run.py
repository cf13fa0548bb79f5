"""Speed of the training hot loop: augmentation, step efficiency against a bare step, data loading.

Usage: ``python bench/run.py [--quick] [--json]`` (``--quick``: fewer repetitions, under 2
minutes on a 2-core CPU; ``--json``: the results as one JSON object on the last line of
stdout), ``python bench/run.py --profile-demo`` (where the wall time of a short cpu-demo
pretrain + finetune goes). ``PYTHONPATH=src`` when the package is not installed.

Sections, each in its own subprocess (so that its peak resident memory is its own):

* ``augment``: pretraining views per second at 28 px / 1 ch, 32 px / 3 ch and 224 px / 3 ch
  (``bench/augment_bench.py``, own ops only);
* ``pretrain``, ``pretrain_memory``, ``finetune``, ``distill``: OUR step -- the real task of the
  stage (``ContrastiveTask`` / ``SupervisedTask`` / ``DistillTask``) and ``engine.Trainer.step``,
  i.e. exactly what the stages' training loop runs per step: next batch of the epoch's order, views
  from the uint8 images, forward, loss, backward, LARS (or the stage's optimiser) at the scheduled
  lr, ``after_step`` (EMA + queue), the loss bookkeeping -- against the BARE step: forward + backward + plain
  ``torch.optim.SGD`` of a copy of the same network on a ready-made float batch of the same
  shape, loss = mean of the outputs squared (+ a no-grad forward of an EMA copy with the memory
  queue, of the teacher for distillation). The cpu-demo preset's model and batch sizes
  (ResNet-18 width 1/8, small-image stem, Fashion-MNIST 28 px, 1 channel). The repetitions
  alternate (ours, bare, ours, bare, ...) so background load hits both alike; ``*_vs_bare`` is
  the ratio of the median images/s (target >= 0.90);
* ``imagefolder``: 2000 JPEGs (64 px) in ``ROOT/train/CLASS/``, decoded + resized to 28 px +
  collated by ``ImageFolderDataset`` through ``engine.BatchStream`` (the loader of the stages,
  with the preset's 2 DataLoader worker processes, and with none), images/s over 2 epochs;
  ``imagefolder_keeps_up``: loader images/s >= the pretraining step's images/s. The same for
  256 px JPEGs -> 224 px views (ImageNet-like, batch 64).
* ``loader_vs_step`` (on request: ``--section loader_vs_step``): a user's folder as the stages see
  it (``--unlabeled-dir``, no image cache: decoded every epoch, as for folders larger than
  ``--image-cache-gb``), 128x96 JPEGs -> 96 px views and 500x375 JPEGs (ImageNet's typical size)
  -> 224 px views: the stage's own batches (``Trainer.batches``: whole images decoded at up to 2x
  the view size, JPEG draft mode, collated as ``ImageBatch``, the default DataLoader workers) against
  the pretraining step on one of those batches (``Trainer.step``: views cut from the whole images,
  colour jitter, forward, NT-Xent, backward, LARS) with the cpu-demo preset's model and
  precision at that size, batch 64. ``loader / step`` > 1: the loader can feed the step. On a CPU the
  two share the cores, so the sustained rate of a run is lower than either; on a GPU machine the
  step's figure is the GPU's and the loader's is what the CPU cores give.

All timings on the CPU in fp32 with ``torch.set_num_threads(2)`` (``--threads N``). When
other processes keep CPUs busy (a note says so), 2-thread timings are dominated by OpenMP
threads waiting for a descheduled peer at every parallel op, which inflates many small ops
(ours) far more than few large ones (bare): compare ``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # augment_bench
try:
    import simclrv2  # noqa: F401
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, os.path.join(HERE, "..", "src"))

from simclrv2.config import load_preset, make_config  # noqa: E402
from simclrv2.checkpoint import CheckpointMeta  # noqa: E402
from simclrv2.engine import BatchStream, Trainer  # noqa: E402
from simclrv2.models import build_model, model_spec  # noqa: E402
from simclrv2.runtime import init_runtime  # noqa: E402

SECTIONS = ["augment", "pretrain", "pretrain_memory", "finetune", "distill", "imagefolder"]
# the model math on the CPU (issue 18), minutes each: not in the default run, ask with --section
KERNEL_SECTIONS = {  # name: (depth, width, image px, batch, synthetic images)
    "kernel_r18": (18, 1.0, 32, 256, 1024),  # the official TF2 comparison's configuration
    "kernel_r50": (50, 1.0, 96, 32, 256),
}
# a user's folder at 96 and 224 px: the stages' loader against the stage's step (minutes): ask with --section
LOADER_SECTION = "loader_vs_step"
LOADER_SIZES = {"96px": (96, 128, 96), "224px": (224, 500, 375)}  # name: (views px, JPEG width, JPEG height)
KERNEL_VARIANTS = ["fp32", "bf16", "fp32+cl", "bf16+cl"]  # precision (+ channels_last)
KERNEL_COMPILE_VARIANTS = ["fp32+cl+compile", "bf16+cl+compile"]  # + torch.compile (inductor): minutes to compile
ALL_SECTIONS = SECTIONS + list(KERNEL_SECTIONS) + [LOADER_SECTION]
PRESET = "cpu-demo"
MEMORY_SIZE = 4096
THREADS = 2  # torch intra-op threads (--threads)


# ----------------------------------------------------------------------------- timing


def time_interleaved(fns: dict, reps: int, warmup: int, budget_s: float = float("inf"),
                     min_reps: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, repetitions interleaved (a, b, a, b, ...); stops
    after ``reps`` rounds, or after ``min_reps`` once ``budget_s`` seconds have passed."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(reps):
        if i >= min_reps and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def compare(ours, bare, batch: int, quick: bool) -> dict:
    """Our step against the bare step, interleaved: images/s of the median repetition of each;
    ``vs_bare`` = ours / bare (also the median of the per-round ratios, and from the best
    repetitions). --quick: at most 12 rounds or 8 s (at least 2 rounds); else 30 rounds or 90 s."""
    reps, warmup, budget, min_reps = (12, 1, 8.0, 2) if quick else (30, 3, 90.0, 5)
    t = time_interleaved({"ours": ours, "bare": bare}, reps, warmup, budget, min_reps)
    ours_s, bare_s = statistics.median(t["ours"]), statistics.median(t["bare"])
    return {
        "batch": batch,
        "reps": len(t["ours"]),
        "ours_images_per_s": batch / ours_s,
        "bare_images_per_s": batch / bare_s,
        "vs_bare": bare_s / ours_s,
        "vs_bare_rounds": statistics.median(b / o for o, b in zip(t["ours"], t["bare"])),
        "vs_bare_best": min(t["bare"]) / min(t["ours"]),
        "ours_ms": [round(1000 * s, 1) for s in t["ours"]],
        "bare_ms": [round(1000 * s, 1) for s in t["bare"]],
    }


def busy_cpus(seconds: float = 1.0) -> float | None:
    """How many CPUs other processes keep busy now (from /proc/stat over ``seconds``; None off Linux)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    except OSError:
        return None
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or the largest of its finished children), MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- our step vs the bare step


def setup(stage: str, **options):
    """(cfg, rt, data) of a stage under the cpu-demo preset, data prepared as the stages do."""
    from simclrv2.stages.common import prepare_data

    cfg = make_config(stage, load_preset(PRESET), out="unused", device="cpu", precision="fp32", **options)
    rt = init_runtime("cpu", "fp32")
    torch.manual_seed(cfg.seed)
    return cfg, rt, prepare_data(cfg)


def our_step(task, cfg, rt, dataset, stage, spec):
    """A closure running one step of the stages' loop: ``Trainer.step`` on the next batch of
    the epoch's order (the stage's schedule, its optimiser, the loss bookkeeping); from step 0
    again after the run's last step. Nothing is written (``Trainer.resume`` / ``log`` are not called)."""
    trainer = Trainer(task, cfg, rt, dataset, "unused", CheckpointMeta(stage, spec))
    state = {"batches": trainer.batches()}
    task.train()

    def step():
        batch = next(state["batches"], None)
        if batch is None:
            trainer.step_count = 0
            state["batches"] = trainer.batches()
            batch = next(state["batches"])
        trainer.step(*batch)

    return step


def bare_step(model, x, extra=None, rt=None):
    """Forward + backward + SGD of ``model`` on the float batch ``x`` (loss: mean of the outputs
    squared), after a no-grad forward of ``extra`` (an EMA copy, a teacher) when given; under
    ``rt``'s autocast when given (bf16), as our step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    model.train()
    autocast = rt.autocast if rt is not None else contextlib.nullcontext

    def step():
        if extra is not None:
            with torch.no_grad(), autocast():
                extra(x)
        with autocast():
            out = model(x)
            out = out[1] if isinstance(out, tuple) else out  # SimCLRModel: (h, z)
            loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def section_pretrain(quick: bool, memory_size: int = 0) -> dict:
    from simclrv2.stages.common import to_device
    from simclrv2.stages.pretrain import ContrastiveTask

    cfg, rt, data = setup("pretrain", memory_size=memory_size)
    spec = model_spec("simclr", depth=cfg.depth, width=cfg.width, sk=cfg.sk, small_images=data.small_images,
                      in_channels=data.channels, head_layers=cfg.head_layers, proj_dim=cfg.proj_dim,
                      num_classes=len(data.classes) if cfg.probe else None, probe_norm=cfg.probe)  # as pretrain()
    model = to_device(build_model(spec), rt, cfg.channels_last)
    bare_model = copy.deepcopy(model)
    task = ContrastiveTask(model, cfg, data, rt)
    b, s = cfg.batch_size, data.image_size
    x = torch.rand(2 * b, data.channels, s, s)  # both views
    ema = copy.deepcopy(bare_model).requires_grad_(False) if memory_size else None
    if memory_size:  # a full queue, as after the first memory_size / 2B steps
        task.memory.enqueue(torch.nn.functional.normalize(torch.randn(memory_size, cfg.proj_dim), dim=1))
    out = compare(our_step(task, cfg, rt, data.all_images(), "pretrain", spec), bare_step(bare_model, x, ema), b, quick)
    out.update(model=f"ResNet-{cfg.depth} x{cfg.width}, {s} px, {data.channels} ch", memory_size=memory_size,
               optimizer=cfg.optimizer)
    return out


def _classifier_spec(m: dict, data, head_layers: int, head_layer: int):
    return model_spec("classifier", depth=m["depth"], width=m["width"], sk=m["sk"], small_images=data.small_images,
                      in_channels=data.channels, head_layers=head_layers, num_classes=len(data.classes),
                      head_layer=head_layer)


def section_classify(quick: bool, stage: str) -> dict:
    """fine-tune: a classifier from head layer 1 on the labeled subset; distill: a same-size
    student on all images against a fixed teacher (the fine-tuned classifier)."""
    from simclrv2.losses import DistillationLoss
    from simclrv2.stages.classify import DistillTask, SupervisedTask
    from simclrv2.stages.common import to_device

    options = {"pretrained": "unused"} if stage == "finetune" else {"teacher": "unused"}
    cfg, rt, data = setup(stage, **options)
    m = load_preset(PRESET)["model"]
    spec = _classifier_spec(m, data, head_layers=3, head_layer=1)
    finetuned = build_model(spec)
    if stage == "finetune":
        model, kw, dataset, extra = finetuned, {}, data.labeled, None
    else:  # self-distillation: a student of the teacher's size, tau 0.1
        spec = _classifier_spec(m, data, head_layers=0, head_layer=0)
        model = build_model(spec)
        teacher = to_device(finetuned, rt, cfg.channels_last)
        kw = {"teacher": teacher, "distill": DistillationLoss(cfg.temperature or 0.1, cfg.alpha)}
        dataset, extra = data.all_images(), teacher
    model = to_device(model, rt, cfg.channels_last)
    bare_model = copy.deepcopy(model)
    task = (DistillTask if kw else SupervisedTask)(model, cfg, data.image_size, rt, **kw)  # puts the teacher in eval mode
    b, s = cfg.batch_size, data.image_size
    x = torch.rand(b, data.channels, s, s)
    out = compare(our_step(task, cfg, rt, dataset, stage, spec), bare_step(bare_model, x, extra), b, quick)
    out.update(model=f"ResNet-{m['depth']} x{m['width']}, {s} px, {data.channels} ch", optimizer=cfg.optimizer)
    return out


def kernel_setup(name: str, variant: str, seed: int = 0):
    """(our step, bare step) of a kernel section: the real
    ``ContrastiveTask`` (views from uint8, 3-layer head, NT-Xent + online probe, LARS) of a
    ResNet on random 3-channel uint8 images, at ``variant``'s precision / memory format."""
    from simclrv2.data import TensorImageDataset
    from simclrv2.stages.common import Data, to_device
    from simclrv2.stages.pretrain import ContrastiveTask

    depth, width, px, batch, n = KERNEL_SECTIONS[name]
    precision, flags = variant.split("+")[0], set(variant.split("+")[1:])
    channels_last, compiled = "cl" in flags, "compile" in flags
    cfg = make_config("pretrain", load_preset(PRESET), out="unused", device="cpu", precision=precision,
                      depth=depth, width=width, batch_size=batch, channels_last=channels_last, compile=compiled)
    rt = init_runtime("cpu", precision)
    g = torch.Generator().manual_seed(seed)
    ds = TensorImageDataset(torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (n,), generator=g).numpy(), [str(c) for c in range(10)])
    data = Data(ds, ds, ds, ds, px, 3, list(ds.classes))
    torch.manual_seed(seed)
    spec = model_spec("simclr", depth=depth, width=width, sk=False, small_images=px <= 32, in_channels=3,
                      head_layers=cfg.head_layers, proj_dim=cfg.proj_dim, num_classes=10, probe_norm=True)
    model = to_device(build_model(spec), rt, channels_last)
    bare_model = copy.deepcopy(model)
    task = ContrastiveTask(model, cfg, data, rt)
    x = torch.rand(2 * batch, 3, px, px)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if compiled:  # the bare step compiled the same way (the model; the optimiser step stays eager)
        bare_model = torch.compile(bare_model)
    return our_step(task, cfg, rt, ds, "pretrain", spec), bare_step(bare_model, x, rt=rt)


def section_kernel(quick: bool, name: str) -> dict:
    """Our full pretraining step against the bare step of the same network, per variant
    (precision, channels_last): the model math (bare) apart from our overhead (ours / bare)."""
    depth, width, px, batch, _ = KERNEL_SECTIONS[name]
    out = {"model": f"ResNet-{depth} x{width}, {px} px, 3 ch, batch {batch}"}
    for variant in KERNEL_VARIANTS:
        out[variant] = compare(*kernel_setup(name, variant), batch, quick)
    return out


# ----------------------------------------------------------------------------- image folder


def write_image_folder(root: str, n: int, side: int = 64, classes: int = 10) -> None:
    """``n`` JPEGs (smooth random colour fields + noise, ``side`` px) in ROOT/train/CLASS/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (side, side, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def loader_speed(ds, batch: int, workers: int, epochs: int, seed: int, rt) -> dict:
    """Images/s of ``epochs`` epochs of ``engine.BatchStream`` over ``ds`` (each epoch starts
    its worker processes afresh, as in ``fit``), and the steady rate after each first batch."""
    stream = BatchStream(ds, batch, seed, rt, workers)
    count, seconds, first_s, first_n = 0, 0.0, 0.0, 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for i, (images, _) in enumerate(stream.epoch(epoch)):
            count += images.shape[0]
            if i == 0:
                first_s, first_n = first_s + time.perf_counter() - t0, first_n + images.shape[0]
        seconds += time.perf_counter() - t0
    return {"images_per_s": count / seconds, "steady_images_per_s": (count - first_n) / max(seconds - first_s, 1e-9),
            "first_batch_s": first_s / epochs}


def section_imagefolder(quick: bool) -> dict:
    """JPEG folders decoded by the stages' loader: the cpu-demo size (64 px files -> 28 px,
    batch 256) and an ImageNet-like one (256 px files -> 224 px, batch 64)."""
    from simclrv2.data import ImageFolderDataset

    cfg = make_config("pretrain", load_preset(PRESET), out="unused", device="cpu")
    rt = init_runtime("cpu", "fp32")
    out = {"default_workers": cfg.workers}
    for name, n, side, size, batch in (("cpu-demo", 2000, 64, 28, cfg.batch_size), ("224px", 256 if quick else 640, 256, 224, 64)):
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            write_image_folder(root, n, side)
            r = {"images": n, "jpeg_side": side, "image_size": size, "batch": batch, "write_s": time.perf_counter() - t0}
            ds = ImageFolderDataset(root, "train", image_size=size)
            for workers in sorted({cfg.workers, 0}, reverse=True):
                r[f"workers_{workers}"] = loader_speed(ds, batch, workers, 2, cfg.seed, rt)
            r["images_per_s"] = r[f"workers_{cfg.workers}"]["images_per_s"]
        out[name] = r
    out["images_per_s"] = out["cpu-demo"]["images_per_s"]
    out["peak_rss_workers_mb"] = peak_rss_mb(children=True)
    return out


def write_unlabeled_folder(root: str, n: int, width: int, height: int) -> None:
    """``n`` JPEGs (smooth random colour fields + noise, ``width`` x ``height``) in nested folders of ROOT."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, f"part{i % 4}")
        os.makedirs(d, exist_ok=True)
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR), dtype=np.int16)
        arr = arr + rng.integers(-20, 21, (height, width, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def section_loader_vs_step(quick: bool) -> dict:
    """The stage's loader (images/s of ``Trainer.batches``) against its pretraining step on one of
    those batches, per size in LOADER_SIZES (see the module docstring)."""
    from simclrv2.stages.common import prepare_data, to_device
    from simclrv2.stages.pretrain import ContrastiveTask

    n, reps = (192, 4) if quick else (640, 10)
    out = {}
    for name, (size, width, height) in LOADER_SIZES.items():
        with tempfile.TemporaryDirectory() as root:
            write_unlabeled_folder(root, n, width, height)
            cfg = make_config("pretrain", load_preset(PRESET), out="unused", device="cpu", unlabeled_dir=root,
                              image_size=size, image_cache_gb=0, batch_size=64, knn_every=0, epochs=1)
            rt = init_runtime("cpu", cfg.precision)
            data = prepare_data(cfg)
            torch.manual_seed(cfg.seed)
            spec = model_spec("simclr", depth=cfg.depth, width=cfg.width, sk=cfg.sk, small_images=data.small_images,
                              in_channels=data.channels, head_layers=cfg.head_layers, proj_dim=cfg.proj_dim,
                              num_classes=None, probe_norm=False, image_size=data.image_size)  # no labels: no probe
            model = to_device(build_model(spec), rt, cfg.channels_last)
            trainer = Trainer(ContrastiveTask(model, cfg, data, rt), cfg, rt, data.all_images(), "unused",
                              CheckpointMeta("pretrain", spec))
            t0, count, first = time.perf_counter(), 0, None
            for _, (images, labels) in zip(range(trainer.steps_per_epoch), trainer.batches()):  # one epoch: the loader alone
                count += images.shape[0]
                if first is None:
                    first, first_s = (images, labels), time.perf_counter() - t0
            loader_s = time.perf_counter() - t0
            trainer.task.train()

            def step():
                trainer.step_count = trainer.total // 2  # mid-schedule lr; the same work at every step
                trainer.step(*first)

            t = time_interleaved({"step": step}, reps, warmup=1)["step"]
            step_ips = first[0].shape[0] / statistics.median(t)
            loader_ips = count / loader_s
            out[name] = {"image_size": size, "jpeg": f"{width}x{height}", "images": count, "batch": cfg.batch_size,
                         "workers": cfg.workers, "precision": str(rt.dtype).replace("torch.", "") if rt.dtype else "fp32",
                         "channels_last": cfg.channels_last, "model": f"ResNet-{cfg.depth} x{cfg.width}",
                         "loader_images_per_s": loader_ips,
                         "loader_steady_images_per_s": (count - first[0].shape[0]) / max(loader_s - first_s, 1e-9),
                         "step_images_per_s": step_ips, "loader_vs_step": loader_ips / step_ips, "reps": len(t)}
    return out


# ----------------------------------------------------------------------------- driver


def run_section(name: str, quick: bool, threads: int = THREADS) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if name == "augment":
        import augment_bench

        out = augment_bench.run(quick=quick, threads=threads, with_kornia=False)["results"]
    elif name == "pretrain":
        out = section_pretrain(quick)
    elif name == "pretrain_memory":
        out = section_pretrain(quick, MEMORY_SIZE)
    elif name in ("finetune", "distill"):
        out = section_classify(quick, name)
    elif name == "imagefolder":
        out = section_imagefolder(quick)
    elif name in KERNEL_SECTIONS:
        out = section_kernel(quick, name)
    elif name == LOADER_SECTION:
        out = section_loader_vs_step(quick)
    else:
        raise SystemExit(f"unknown section {name!r}; expected one of {', '.join(ALL_SECTIONS)}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "result": out}


def run_in_subprocess(name: str, quick: bool, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--threads", str(threads)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench section {name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(sections: dict) -> dict:
    """The headline figures."""
    r = {k: v["result"] for k, v in sections.items()}
    out = {}
    for name in ("pretrain", "pretrain_memory", "finetune", "distill"):
        if name in r:
            key = "pretrain_memory_vs_bare" if name == "pretrain_memory" else f"{name}_step_vs_bare"
            out[key] = round(r[name]["vs_bare"], 3)
            out[f"{name}_images_per_s"] = round(r[name]["ours_images_per_s"], 1)
    for name in KERNEL_SECTIONS:
        for variant in KERNEL_VARIANTS if name in r else ():
            out[f"{name}_{variant}_vs_bare"] = round(r[name][variant]["vs_bare"], 3)
            out[f"{name}_{variant}_images_per_s"] = round(r[name][variant]["ours_images_per_s"], 1)
    for cfg_name, a in r.get("augment", {}).items():
        out[f"augment_{cfg_name}_images_per_s"] = round(a["own_images_per_s"])
    for size, x in r.get(LOADER_SECTION, {}).items():
        out[f"loader_vs_step_{size}"] = round(x["loader_vs_step"], 2)
    if "imagefolder" in r:
        out["imagefolder_images_per_s"] = round(r["imagefolder"]["images_per_s"], 1)
        if "pretrain" in r:
            out["imagefolder_keeps_up"] = r["imagefolder"]["images_per_s"] >= r["pretrain"]["ours_images_per_s"]
    out["peak_rss_mb"] = {k: round(v["peak_rss_mb"]) for k, v in sections.items()}
    return out


def print_table(report: dict) -> None:
    r = {k: v["result"] for k, v in report["sections"].items()}
    busy = report["busy_cpus_at_start"]
    print(f"{report['date']}  torch {report['torch']}, {report['threads']} threads, quick={report['quick']}, "
          f"load average {report['loadavg_1min_start']:.2f} -> {report['loadavg_1min_end']:.2f}"
          + (f", {busy:.1f} of {report['cpus']} CPUs busy at the start" if busy is not None else ""))
    print("| section | ours img/s | bare img/s | ours / bare (per-round, best) | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for name in ("pretrain", "pretrain_memory", "finetune", "distill"):
        if name in r:
            x = r[name]
            print(f"| {name} (batch {x['batch']}, {x['reps']} reps) | {x['ours_images_per_s']:,.1f} | "
                  f"{x['bare_images_per_s']:,.1f} | {x['vs_bare']:.3f} ({x['vs_bare_rounds']:.3f}, {x['vs_bare_best']:.3f}) | "
                  f"{report['sections'][name]['peak_rss_mb']:,.0f} |")
    for name in KERNEL_SECTIONS:
        for variant in KERNEL_VARIANTS if name in r else ():
            x = r[name][variant]
            print(f"| {name} {variant} ({r[name]['model']}, {x['reps']} reps) | {x['ours_images_per_s']:,.1f} | "
                  f"{x['bare_images_per_s']:,.1f} | {x['vs_bare']:.3f} ({x['vs_bare_rounds']:.3f}, {x['vs_bare_best']:.3f}) | "
                  f"{report['sections'][name]['peak_rss_mb']:,.0f} |")
    for cfg_name, a in r.get("augment", {}).items():
        print(f"| augment {cfg_name} (batch {a['batch']}) | {a['own_images_per_s']:,.0f} (best {a['own_images_per_s_best']:,.0f}) "
              f"| | | {report['sections']['augment']['peak_rss_mb']:,.0f} |")
    if "imagefolder" in r:
        f = r["imagefolder"]
        for name in ("cpu-demo", "224px"):
            x = f[name]
            for w in sorted({f["default_workers"], 0}, reverse=True):
                y = x[f"workers_{w}"]
                print(f"| imagefolder {name} ({x['jpeg_side']} px JPEG -> {x['image_size']} px, {w} workers, batch "
                      f"{x['batch']}) | {y['images_per_s']:,.0f} (steady {y['steady_images_per_s']:,.0f}) | | | "
                      f"{report['sections']['imagefolder']['peak_rss_mb']:,.0f} (workers {f['peak_rss_workers_mb']:,.0f}) |")
    for size, x in r.get(LOADER_SECTION, {}).items():
        print(f"| loader vs step {size} ({x['jpeg']} JPEG -> {x['image_size']} px, {x['model']}, {x['precision']}, "
              f"batch {x['batch']}, {x['workers']} workers) | loader {x['loader_images_per_s']:,.0f} (steady "
              f"{x['loader_steady_images_per_s']:,.0f}) | step {x['step_images_per_s']:,.1f} | loader / step "
              f"{x['loader_vs_step']:.1f} | {report['sections'][LOADER_SECTION]['peak_rss_mb']:,.0f} |")
    print("section seconds: " + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in report["sections"].items())
          + f"; total {report['seconds']:.0f}")
    s = report["summary"]
    print(", ".join(f"{k}={v}" for k, v in s.items() if k.endswith(("vs_bare", "keeps_up")) or k.startswith("loader_vs")))
    busy = report["busy_cpus_at_start"]
    if busy is not None and report["threads"] > 1 and busy > report["cpus"] - report["threads"] + 0.5:
        print(f"note: other processes kept {busy:.1f} of {report['cpus']} CPUs busy at the start: with {report['threads']} "
              "threads, parallel ops wait for descheduled threads, which inflates many small ops (ours) most; "
              "compare --threads 1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under 2 minutes)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch intra-op threads (default {THREADS})")
    parser.add_argument("--section", action="append", choices=ALL_SECTIONS,
                        help="only this section (repeatable); the kernel_* sections (minutes each) run only when named")
    parser.add_argument("--worker", choices=ALL_SECTIONS, help=argparse.SUPPRESS)  # one section, in this process
    parser.add_argument("--profile-demo", action="store_true",
                        help="profile a short cpu-demo pretrain + finetune: where the wall time goes")
    args = parser.parse_args(argv)
    if args.profile_demo:
        import profile_pipeline

        return profile_pipeline.main(["--threads", str(args.threads)] + (["--json"] if args.json else []))
    if args.worker:  # run_in_subprocess's child: one section, its result as JSON
        print(json.dumps(run_section(args.worker, args.quick, args.threads)))
        return 0
    report = {
        "benchmark": "run", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": args.threads, "quick": args.quick, "cpus": os.cpu_count(),
        "loadavg_1min_start": os.getloadavg()[0], "busy_cpus_at_start": busy_cpus(),
    }
    t0 = time.perf_counter()
    report["sections"] = {name: run_in_subprocess(name, args.quick, args.threads) for name in (args.section or SECTIONS)}
    report["seconds"] = time.perf_counter() - t0
    report["loadavg_1min_end"] = os.getloadavg()[0]
    report["summary"] = summarise(report["sections"])
    print_table(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
