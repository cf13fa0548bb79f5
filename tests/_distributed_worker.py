"""Runs under ``torchrun --nproc_per_node 2`` for tests/test_distributed.py (not a test module itself).

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_distributed_worker.py OUT START``

(START: the directory of :func:`make_start_checkpoints`.)

1. Global BatchNorm check: GlobalBatchNorm on 2 ranks x n rows against nn.BatchNorm on the 2n
   rows in this process (outputs, input / parameter gradients, running statistics) ->
   OUT/bn_check.json (written by rank 0).
2. The stages of :func:`stage_configs` (the same configs the test runs in one process, but
   ``ONE_PROCESS_ONLY``) with outputs in OUT/<name>.
3. The memory-queue pretraining again, interrupted after its 2nd step (checkpoint at step 2) and
   continued by running it again (as a torchrun restart does): OUT/pretrain_resumed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

DIGITS = dict(dataset="digits", precision="fp32", device="cpu", seed=3, log_every=1, checkpoint_every=1000, min_steps=0,
              label_fraction=0.1)
MODEL = dict(depth=18, width=0.125)
STEPS = 3
ONE_PROCESS_ONLY = ("pretrain_accumulate4",)  # the reference of a two-process run with other options


def _epochs(images: int, batch: int) -> float:
    return STEPS / (images // batch)


def make_start_checkpoints(start: Path) -> None:
    """Randomly initialised 'pretrained' (START/pretrained) and 'teacher' (START/teacher)
    checkpoints, so that the one- and two-process fine-tuning and distillation start alike."""
    from simclrv2 import checkpoint as ckpt
    from simclrv2.models import build_model, model_spec

    common = dict(MODEL, sk=False, small_images=True, in_channels=1)
    for name, spec in [("pretrained", model_spec("simclr", **common, num_classes=10)),
                       ("teacher", model_spec("classifier", **common, head_layers=0, num_classes=10))]:
        torch.manual_seed(1)
        model = build_model(spec)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        ckpt.save_checkpoint(start / name / "final", tensors,
                             ckpt.CheckpointMeta(name, spec, classes=[str(i) for i in range(10)], complete=True))


def stage_configs(out: Path, start: Path) -> list[tuple[str, str, dict]]:
    """(name, stage, options): pretraining without / with the memory queue, fine-tuning, and
    distillation mixing true labels (alpha < 1), each a few steps with global batch 32."""
    pre = dict(DIGITS, **MODEL, batch_size=32, epochs=_epochs(1437, 32), temperature=0.5, color_strength=0.5,
               blur=True, crop_min=0.2, knn_every=0, knn_train_size=300, lr=0.01, optimizer="sgd")
    return [
        ("pretrain", "pretrain", dict(pre, out=str(out / "pretrain"))),
        ("pretrain_memory", "pretrain", dict(pre, out=str(out / "pretrain_memory"), memory_size=80, memory_decay=0.9)),
        # activation checkpointing: global BN runs (and all-gathers) again in the recomputation; compared
        # with the one-process run of "pretrain", without checkpointing (REFERENCE in test_distributed.py)
        ("pretrain_checkpointed", "pretrain", dict(pre, out=str(out / "pretrain_checkpointed"), activation_checkpointing=True)),
        # gradient accumulation, 2 micro-batches of 8 images per process, BN per process (--no-sync-bn): the
        # micro-batches are the global batch's blocks of 8, those of one process with 4 (ONE_PROCESS_ONLY)
        ("pretrain_accumulate", "pretrain", dict(pre, out=str(out / "pretrain_accumulate"), memory_size=80, memory_decay=0.9,
                                                 accumulate=2, sync_bn=False)),
        ("pretrain_accumulate4", "pretrain", dict(pre, out=str(out / "pretrain_accumulate4"), memory_size=80,
                                                  memory_decay=0.9, accumulate=4, sync_bn=False)),
        ("finetune", "finetune", dict(DIGITS, out=str(out / "finetune"), pretrained=str(start / "pretrained"),
                                      batch_size=32, epochs=_epochs(144, 32), lr=0.05)),
        ("distill", "distill", dict(DIGITS, out=str(out / "distill"), teacher=str(start / "teacher"),
                                    batch_size=32, epochs=_epochs(1437, 32), alpha=0.5, pad_crop=2, lr=0.02)),
    ]


def run_stages(out: Path, start: Path, skip: tuple[str, ...] = ()) -> None:
    """Each stage (but ``skip``); every process saves the result its call returned (OUT/<name>/returned.<rank>.json)."""
    from simclrv2 import stages
    from simclrv2.config import make_config

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, stage, options in stage_configs(out, start):
        if name in skip:
            continue
        result = getattr(stages, stage)(make_config(stage, **options))
        (out / name / f"returned.{rank}.json").write_text(json.dumps(result))


class _Stop(Exception):
    pass


def interrupted_then_resumed(out: Path, start: Path) -> None:
    from simclrv2.config import make_config
    from simclrv2.engine import step_hook
    from simclrv2.stages import pretrain

    options = dict(stage_configs(out, start)[1][2], out=str(out / "pretrain_resumed"), checkpoint_every=2)

    def stop(trainer):
        if trainer.step_count == 3:  # after the 3rd step's update (EMA and queue too), before its checkpoint: killed
            raise _Stop

    try:
        with step_hook(stop):
            pretrain(make_config("pretrain", **options))
        raise AssertionError("the run was not interrupted")
    except _Stop:
        pass
    torch.distributed.barrier()
    # run again as a torchrun restart would (the same command, no --resume): rank 0 finds the interrupted run
    # in OUT and every rank continues it
    pretrain(make_config("pretrain", **options))


def bn_check(rank: int, world: int) -> dict[str, float]:
    """Max relative errors of GlobalBatchNorm (this rank's rows) against nn.BatchNorm (all rows)."""
    from simclrv2.distributed import GlobalBatchNorm
    from simclrv2.models.head import BatchNorm1dNoShift

    errors = {}
    cases = {
        "bn2d": (lambda: nn.BatchNorm2d(6), (8, 6, 5, 5)),
        "bn2d_channels_last": (lambda: nn.BatchNorm2d(6), (8, 6, 5, 5)),
        "bn1d": (lambda: nn.BatchNorm1d(6), (8, 6)),
        "bn1d_no_shift": (lambda: BatchNorm1dNoShift(6), (8, 6)),
        "bn1d_cumulative": (lambda: nn.BatchNorm1d(6, momentum=None), (8, 6)),
    }
    for name, (make, shape) in cases.items():
        torch.manual_seed(0)
        ref = make()
        if ref.weight is not None:
            nn.init.uniform_(ref.weight, 0.5, 1.5)
        if ref.bias is not None:
            nn.init.uniform_(ref.bias, -0.5, 0.5)
        glob = GlobalBatchNorm.convert(nn.Sequential(make()))[0]
        glob.load_state_dict(ref.state_dict())
        assert isinstance(glob, GlobalBatchNorm) and (glob.bias is None) == (ref.bias is None)
        x = torch.randn(*shape) * 3 + 2
        if name.endswith("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        w_out = torch.randn(*shape)  # the loss is sum(y * w_out): a generic upstream gradient
        n = shape[0] // world
        mine = slice(rank * n, (rank + 1) * n)
        for _ in range(2):  # two steps: running statistics accumulate
            xr = x.clone().requires_grad_(True)
            y_ref = ref(xr)
            (y_ref * w_out).sum().backward()
            xl = x[mine].clone().requires_grad_(True)
            y = glob(xl)
            (y * w_out[mine]).sum().backward()
            pairs = [("out", y, y_ref[mine]), ("grad_x", xl.grad, xr.grad[mine])]
            for pname in ("weight", "bias"):
                p_glob, p_ref = getattr(glob, pname), getattr(ref, pname)
                if p_ref is not None:
                    g = p_glob.grad.clone()
                    torch.distributed.all_reduce(g)  # what DDP does (then / world: the loss is summed here)
                    pairs.append((f"grad_{pname}", g, p_ref.grad))
                    p_glob.grad = p_ref.grad = None
            pairs += [("running_mean", glob.running_mean, ref.running_mean), ("running_var", glob.running_var, ref.running_var)]
            for what, a, b in pairs:
                err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                errors[f"{name}.{what}"] = max(errors.get(f"{name}.{what}", 0.0), err)
        glob.eval()
        ref.eval()
        errors[f"{name}.eval"] = ((glob(x[mine]) - ref(x[mine])).abs().max()).item()
    return errors


def main() -> None:
    out, start = Path(sys.argv[1]), Path(sys.argv[2])
    from simclrv2.runtime import init_runtime

    rt = init_runtime("cpu", "fp32")
    assert rt.world_size == 2, "run me with torchrun --nproc_per_node 2"
    errors = bn_check(rt.rank, rt.world_size)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bn_check.json").write_text(json.dumps(errors, indent=1))
    run_stages(out, start, skip=ONE_PROCESS_ONLY)
    interrupted_then_resumed(out, start)
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
