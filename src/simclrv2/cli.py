"""The `simclrv2` command: a thin layer over the stage functions.

Every stage option comes from the stage's config dataclass (so CLI and Python share names and
defaults); presets fill in values, explicit options win.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from typing import Any, Sequence

from simclrv2 import __version__
from simclrv2.config import (BIT_DEPTH_CHOICES, EVALUATE_DEFAULTS, IMPORT_TF_DEFAULTS, INFERENCE_DEFAULTS, FEATURE_NORMS, STAGE_CONFIGS, STEMS, load_preset, make_config,
                             preset_description, preset_names)
from simclrv2.errors import UserError

HELP = {
    "out": "output directory of the stage (checkpoints, config, metrics)",
    "dataset": "fashion-mnist | digits | cifar10 | cifar100 | stl10 | imagefolder (with --data-dir ROOT: "
               "ROOT/train/CLASS/*, ROOT/val/CLASS/*, ROOT/unlabeled/*; implied by --unlabeled-dir / --labeled-dir / "
               "--test-dir)",
    "data_dir": "dataset location (required except for fashion-mnist and digits)",
    "image_size": "side of the training views in pixels (default: the dataset's own; image folders: 224 with "
                  "--data-dir, else the images' median shorter side rounded to a multiple of 8, within 32..224)",
    "unlabeled_dir": "your own unlabeled images: a folder of image files, any nesting (subfolders are not classes); "
                     "used by pretrain and distill; implies --dataset imagefolder",
    "labeled_dir": "your own labelled images: DIR/CLASS/* (any nesting below each class folder); the labelled set, "
                   "all of it unless --label-fraction / --labels-per-class asks for less; implies --dataset imagefolder",
    "test_dir": "your own held-out labelled images: DIR/CLASS/*, the same classes; the test accuracy and the kNN "
                "monitor (none without it)",
    "bit_depth": "image folders: how integer images of more than 8 bits (16-bit PNG/TIFF) are scaled to 0..1: "
                 "value / (2**BITS - 1); auto = the fewest of 8, 10, 12, 14, 16 bits holding the largest value found "
                 "by the image check (16 with --no-check-images)",
    "decode_scale": "image folders: images are decoded whole with their shorter side reduced to at most this many "
                    "times --image-size (aspect ratio kept; smaller images are not enlarged); random crops are cut "
                    "from that, as in the paper",
    "image_cache_gb": "image folders: decode every image once and keep it in memory when all of them take at most "
                      "this many GB (per process); 0 = decode from disk every epoch",
    "stem": "ResNet stem: small (3x3 stride-1 convolution, no max pool; for small images) | imagenet (7x7 stride-2 "
            "convolution + max pool) | auto (small at <= 32 px); recorded in the model",
    "feature_norm": "linear evaluation: read the frozen features through a BatchNorm without affine parameters: on | "
                    "off | auto (on when BatchNorm's running statistics do not describe the encoder: its features "
                    "in evaluation mode are over 2x larger or smaller than with batch statistics, as after a short "
                    "pretraining, where the classifier's loss can blow up)",
    "min_steps": "train at least this many optimiser steps (epochs are raised on a small labelled set; the built-in "
                 "presets train longer already); 0 = exactly --epochs",
    "label_fraction": "fraction of labeled training images per class, e.g. 0.01 or 0.1 (--labeled-dir: default 1, "
                      "all of them)",
    "labels_per_class": "number of labeled images per class (instead of --label-fraction)",
    "subset_file": "text file of labeled image identifiers, one per line (like ImageNet's 1percent.txt)",
    "val_size": "training images held out as a class-balanced, seeded validation split (never labeled for "
                "training; the labeled subset is drawn from the rest, with the whole class's counts); classifier "
                "stages report val_top1 on it (0 = none)",
    "resume": "continue the interrupted run in OUT even if its options differ from this command's (a run with "
              "the same options is continued, and a finished one reused, without it)",
    "restart": "throw away the run in OUT (finished or interrupted) and train from the start",
    "allow_unverified": "load input checkpoints that have no checksum (a warning names each)",
    "lr": "base learning rate (scaled by --lr-scaling and the batch size)",
    "batch_size": "global batch size (all processes together)",
    "accumulate": "gradient accumulation: each batch as K micro-batches of batch/K images, one after the other, for "
                  "the update of the whole batch in about 1/K of the activation memory (BatchNorm normalises each "
                  "micro-batch by its own statistics; pretraining adds a first pass without gradients, about 1/3 more "
                  "compute); K must divide the images per process",
    "workers": "decode workers per process for image folders, or auto (the cores of this process less one, at most 8)",
    "precision": "auto (bf16 where the hardware computes it natively, else fp32) | bf16 | fp16 (CUDA GPUs without "
                 "bf16, e.g. V100/T4; with loss scaling) | fp32 (IEEE: TF32 off unless --tf32)",
    "tf32": "CUDA: TF32 float32 matmuls and convolutions (default: on, except with --precision fp32)",
    "check_images": "image folders: decode every image once before training (results cached per file); "
                    "--no-check-images starts at once, and a broken file then stops training when a loader meets it",
    "dist_timeout": "torchrun: seconds a collective may wait for the slowest process before the run fails",
    "head_layer": "fine-tune from this projection-head layer (default 1 with <= 10%% labels, else 0)",
    "memory_size": "MoCo-style queue of EMA keys used as extra negatives (0 = off)",
    "teacher": "fine-tuned checkpoint (file or stage directory) that labels the images",
    "pretrained": "pretrained checkpoint (file or stage directory)",
    "activation_checkpointing": "recompute each ResNet block (and the stem) in the backward pass instead of keeping "
                                "its activations: about 1/3 of the memory per image at about 1/3 more compute; "
                                "the results and checkpoints are the same",
    "skip_bad_images": "image folders: skip unreadable image files (counted and logged) instead of stopping",
}

_TYPES = {"int": int, "float": float, "str": str}
CHOICES = {"bit_depth": BIT_DEPTH_CHOICES, "stem": STEMS, "feature_norm": FEATURE_NORMS}  # str options with a fixed set of values


def _workers(value: str) -> int | str:
    """--workers N or auto (resolved by make_config)."""
    return value if value == "auto" else int(value)


def _add_config_options(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" ", "").split("|")
        base = kind[0]
        help_ = HELP.get(f.name, "")
        default = f.default
        help_ = f"{help_} (default: {default})" if help_ else f"default: {default}"
        if base == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name in CHOICES:
            parser.add_argument(flag, dest=f.name, choices=CHOICES[f.name], default=None, help=help_)
        else:
            type_ = _workers if f.name == "workers" else _TYPES[base]
            parser.add_argument(flag, dest=f.name, type=type_, default=None, help=help_, metavar=base.upper())


def _stage_parser(sub, name: str, stage: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--preset", default=None, help=f"preset name ({', '.join(preset_names())}) or a YAML file")
    _add_config_options(p, STAGE_CONFIGS[stage])
    p.set_defaults(stage=stage)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"simclrv2: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simclrv2", description="SimCLRv2: pretrain, fine-tune, distil.")
    parser.add_argument("--version", action="version", version=f"simclrv2 {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _stage_parser(sub, "pretrain", "pretrain", "contrastive pretraining of encoder + projection head")
    _stage_parser(sub, "finetune", "finetune", "fine-tune a pretrained model from a head layer on the labeled subset")
    _stage_parser(sub, "distill", "distill", "distil a fine-tuned teacher into a student on all training images")
    _stage_parser(sub, "linear-eval", "linear_eval", "linear classifier on a frozen pretrained encoder")
    _stage_parser(sub, "supervised", "supervised", "baseline: train from scratch on the labeled subset")

    p = sub.add_parser("evaluate", help="top-1 / top-5 of a classifier checkpoint on a dataset split")
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", default=None)
    d = EVALUATE_DEFAULTS
    p.add_argument("--split", default=d["split"], help=f"train | test | val (default: {d['split']})")
    p.add_argument("--device", default=d["device"], help=f"auto | cpu | cuda | cuda:N (default: {d['device']})")
    p.add_argument("--precision", default=d["precision"], help=f"auto | fp32 | bf16 | fp16 (default: {d['precision']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"images per forward pass (default: {d['batch_size']})")
    p.add_argument("--workers", type=int, default=d["workers"], help=f"image-folder decode workers (default: {d['workers']})")
    _allow_unverified_option(p)

    p = sub.add_parser("pipeline", help="the whole recipe for each label fraction, with a report")
    p.add_argument("--preset", default="cpu-demo", help=f"one of {', '.join(preset_names())} or a YAML file (default: cpu-demo)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--label-fraction", dest="label_fractions", type=float, nargs="+", default=None,
                   help="one or more label fractions (default: the preset's)")
    p.add_argument("--out", required=True, help="output directory; finished stages found there are reused")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.OPTION=VALUE",
                   help="override a preset value, e.g. --set pretrain.epochs=5 or --set seed=1 (repeatable)")
    p.add_argument("--device", default=None)
    for name in ("unlabeled_dir", "labeled_dir", "test_dir"):
        p.add_argument("--" + name.replace("_", "-"), default=None, metavar="DIR", help=HELP[name])
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help="run only these of supervised, pretrain, linear_eval, finetune, distill (default: all); "
                        "e.g. the supervised baselines in a second process while the first pretrains, same --out")

    _inference_parsers(sub)

    p = sub.add_parser("presets", help="list the shipped presets, or print one")
    p.add_argument("name", nargs="?")
    p = sub.add_parser("summary", help="print an encoder's structure and parameter count")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--sk", action="store_true")
    return parser


def _allow_unverified_option(p) -> None:
    p.add_argument("--allow-unverified", action="store_true", help=HELP["allow_unverified"])


def _inference_parsers(sub) -> None:
    """embed, predict, export, import-tf: using trained models (simclrv2.inference)."""
    def runtime_options(p):
        d = INFERENCE_DEFAULTS
        p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"images per forward pass (default: {d['batch_size']})")
        p.add_argument("--device", default=d["device"], help=f"auto | cpu | cuda | cuda:N (default: {d['device']})")
        p.add_argument("--precision", default=d["precision"], help=f"fp32 | bf16 | fp16 | auto (default: {d['precision']})")
        _allow_unverified_option(p)

    p = sub.add_parser("embed", help="features of image files or folders -> .npy (+ .paths.txt with the row order)",
                       description="Features of images (the encoder output, a projection-head layer of a pretrained "
                                   "checkpoint, or what a classifier's fc sees) saved as a float32 .npy array; the "
                                   "row order goes to OUT's .paths.txt sidecar.")
    p.add_argument("checkpoint", help="checkpoint file or stage directory (any kind)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output .npy file, e.g. feats.npy (row order: feats.paths.txt)")
    p.add_argument("--head-layer", type=int, default=None,
                   help="pretrained: projection-head layer k (default 0 = encoder output); "
                        "classifier: default = the features before its fc")
    runtime_options(p)

    p = sub.add_parser("predict", help="class predictions of a classifier for image files or folders -> CSV")
    p.add_argument("checkpoint", help="classifier checkpoint (finetune / distill / supervised / linear-eval)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output CSV: path, class, probability, top5")
    runtime_options(p)

    p = sub.add_parser("export", help="ONNX export of a classifier checkpoint")
    p.add_argument("checkpoint", help="classifier checkpoint (e.g. the distilled student)")
    p.add_argument("--onnx", required=True,
                   help="output .onnx file; its metadata holds the class names and the preprocessing (README: "
                        "'Running an exported model'); the class names also go to NAME.classes.txt. "
                        "Needs the onnx extra: pip install 'simclrv2[onnx]'")
    _allow_unverified_option(p)

    p = sub.add_parser("import-tf", help="convert an official SimCLRv2 TensorFlow checkpoint (no TensorFlow needed)")
    p.add_argument("checkpoint", help="TF checkpoint prefix (DIR/model.ckpt-N), its .index file, or its directory")
    p.add_argument("--out", required=True, help="output directory (final.safetensors + final.json)")
    p.add_argument("--kind", choices=["simclr", "classifier"], default=None,
                   help="default: from the checkpoint's heads and path (pretrained / finetuned_*)")
    p.add_argument("--head-layer", type=int, default=None, help="classifier: the head layer it was fine-tuned from")
    p.add_argument("--ema", action="store_true", help="import the ema_model/ copy (TF1)")
    p.add_argument("--image-size", type=int, default=IMPORT_TF_DEFAULTS["image_size"],
                   help=f"image side in pixels recorded in the checkpoint (default: {IMPORT_TF_DEFAULTS['image_size']})")


def _run_inference(args) -> dict[str, Any]:
    from simclrv2 import inference

    if args.command == "embed":
        r = inference.embed(args.checkpoint, args.images, args.out, args.head_layer, args.batch_size, args.device,
                            args.precision)
        return {"out": r["out"], "paths_file": r["paths_file"], "images": len(r["paths"]),
                "shape": list(r["features"].shape), "layer": r["layer"], "checkpoint": r["checkpoint"]}
    if args.command == "predict":
        r = inference.predict(args.checkpoint, args.images, args.out, args.batch_size, args.device, args.precision)
        return {"out": r["out"], "images": len(r["paths"]), "checkpoint": r["checkpoint"]}
    if args.command == "export":
        return inference.export(args.checkpoint, args.onnx)
    return inference.import_tf(args.checkpoint, args.out, args.kind, args.head_layer, args.ema, args.image_size)


def _run_stage(args) -> dict[str, Any]:
    import simclrv2.stages as stages

    preset = load_preset(args.preset)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(STAGE_CONFIGS[args.stage])}
    cfg = make_config(args.stage, preset, **overrides)
    return getattr(stages, args.stage)(cfg)


_WORKER_TRACE = "Original Traceback"
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\w*: (.+)$")


def one_line(e: BaseException) -> str:
    """An error's message on one line. An exception re-raised from a DataLoader worker carries the
    worker's whole traceback in its message: keep the original exception's own message."""
    text = str(e).strip()
    if _WORKER_TRACE in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        m = _EXC_LINE.match(lines[-1])
        text = m.group(1) if m else lines[-1]
    return " ".join(text.split()) or type(e).__name__


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    oom = getattr(__import__("torch"), "OutOfMemoryError", ()) if "torch" in sys.modules else ()
    return (bool(oom) and isinstance(e, oom)) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in str(e) or "out of memory" in str(e).lower()))


def _is_worker_failure(e: BaseException) -> bool:
    text = str(e)
    return _WORKER_TRACE in text or "DataLoader worker" in text


def _interrupted(args) -> str:
    """How to carry on after Ctrl-C."""
    if getattr(args, "stage", None) and getattr(args, "out", None):
        from pathlib import Path

        from simclrv2.checkpoint import step_of

        last = Path(args.out) / "last.safetensors"
        step = step_of(last) if last.exists() else None
        if step is None:
            return "simclrv2: interrupted before the first checkpoint; run the same command again to start over"
        return f"simclrv2: interrupted; run the same command again to continue (it picks up from {last}, step {step})"
    if args.command == "pipeline":
        return "simclrv2: interrupted; run the same pipeline command again: finished stages are reused"
    return "simclrv2: interrupted"


def _unverified(args):
    """--allow-unverified of evaluate / embed / predict / export (stages read it from their config)."""
    if getattr(args, "allow_unverified", None) is True:
        from simclrv2.checkpoint import unverified_allowed

        return unverified_allowed()
    return contextlib.nullcontext()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, bad arguments (already printed on one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        from simclrv2.runtime import setup_logging
    except ImportError as e:  # e.g. a torch older than the floor
        print(f"simclrv2: error: {one_line(e)}", file=sys.stderr)
        return 2

    setup_logging(-1 if args.quiet else 1 if args.verbose else 0)
    rc = None
    try:
        rc = _command(args)
        return rc
    finally:
        _leave_process_group(rc == 0)


def _leave_process_group(ok: bool) -> None:
    """Under torchrun: every rank leaves the process group together (after a success) before exiting."""
    distributed = sys.modules.get("simclrv2.distributed")  # imported only by commands that may have joined one
    if distributed is not None:
        distributed.shutdown(wait=ok)


def _command(args) -> int:
    try:
        with _unverified(args):
            if args.command == "presets":
                if args.name:
                    import yaml

                    print(yaml.safe_dump(load_preset(args.name), sort_keys=False), end="")
                else:
                    names = preset_names()
                    width = max(map(len, names))
                    print("\n".join(f"{n:<{width}}  {preset_description(n)}" for n in names))
                return 0
            if args.command == "summary":
                from simclrv2.config import check_sk
                from simclrv2.models import build_resnet, sk_options

                check_sk(args.depth, args.sk)
                enc = build_resnet(args.depth, args.width, **sk_options(args.sk))
                n = sum(p.numel() for p in enc.parameters())
                print(f"ResNet-{args.depth} {args.width}x{' +SK' if args.sk else ''}: {n / 1e6:.2f}M parameters, {enc.out_dim}-d features")
                return 0
            if args.command == "evaluate":
                from simclrv2.errors import ConfigError
                from simclrv2.stages import evaluate

                if args.batch_size < 1:
                    raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
                result = evaluate(args.checkpoint, args.dataset, args.data_dir, args.split, args.device, args.precision,
                                  args.batch_size, args.workers)
            elif args.command in ("embed", "predict", "export", "import-tf"):
                result = _run_inference(args)
            elif args.command == "pipeline":
                from simclrv2.pipeline import parse_overrides, run_pipeline

                result = run_pipeline(args.preset, args.out, dataset=args.dataset, data_dir=args.data_dir,
                                      label_fractions=args.label_fractions, overrides=parse_overrides(args.overrides),
                                      device=args.device, stages=args.stages, unlabeled_dir=args.unlabeled_dir,
                                      labeled_dir=args.labeled_dir, test_dir=args.test_dir)
            else:
                result = _run_stage(args)
            print(json.dumps(result, indent=2, default=str))
            return 0
    except UserError as e:
        print(f"simclrv2: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, ... : name the file, no traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"simclrv2: error: {where}{' '.join(str(e.strerror or one_line(e)).split())}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - only the kinds below; anything else is a bug and keeps its traceback
        if _is_out_of_memory(e):
            print(f"simclrv2: error: out of memory ({one_line(e)[:200]}); try a smaller --batch-size, "
                  "--width or --image-size", file=sys.stderr)
            return 1
        if _is_worker_failure(e):
            print(f"simclrv2: error: data loading failed: {one_line(e)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
