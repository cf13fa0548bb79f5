"""Configuration as plain data: one dataclass per stage, presets as YAML, CLI overrides.

Resolution order: dataclass defaults < preset (top-level keys, then the stage's section) < explicit
options. Every run writes its resolved config to ``OUT/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from simclrv2.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BIT_DEPTH_CHOICES = ("auto", "8", "10", "12", "14", "16")
STEMS = ("auto", "small", "imagenet")
FEATURE_NORMS = ("auto", "on", "off")
FOLDER_OPTIONS = ("unlabeled_dir", "labeled_dir", "test_dir")  # your own images (data/folders.py)
MIN_STEPS = 150  # classifier stages train at least this many optimiser steps (docs/method.md §8)
DIST_TIMEOUT_S = 1800.0  # default process-group timeout; every collective of ours is shorter (data/image_check.py)
MAX_EPOCHS = 100_000  # sanity bounds: values past these are typing mistakes, not experiments
MAX_WIDTH = 16

@dataclass
class RunConfig:
    """Options every training stage shares."""

    out: str = ""
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    unlabeled_dir: str | None = None  # your own images: a plain folder, any nesting (data/folders.py)
    labeled_dir: str | None = None  # your own labelled images: DIR/CLASS/*, all labels used by default
    test_dir: str | None = None  # your own held-out labelled images: DIR/CLASS/*
    image_size: int | None = None  # None: the dataset's native size (image folders: data/folders.py)
    bit_depth: str = "auto"  # image folders: bits of >8-bit images (auto | 8 | 10 | 12 | 14 | 16)
    decode_scale: float = 2.0  # image folders: decoded shorter side, as a multiple of image_size
    image_cache_gb: float = 2.0  # image folders: keep the decoded images in memory when they fit (per process)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where native) | bf16 | fp16 (CUDA, with loss scaling) | fp32
    tf32: bool | None = None  # CUDA: TF32 matmuls/convolutions; None = on unless precision is fp32
    channels_last: bool = False
    compile: bool = False
    activation_checkpointing: bool = False  # recompute the encoder's blocks in backward: less memory, ~1/3 more compute
    workers: int = 2  # decode workers for on-disk image folders (per process); "auto" in presets and options: auto_workers()
    skip_bad_images: bool = False  # image folders: skip unreadable files (logged) instead of stopping
    check_images: bool = True  # image folders: decode every image before training (cached per file)
    dist_timeout: float = DIST_TIMEOUT_S  # seconds a collective may wait under torchrun before the run fails
    resume: bool = False  # continue the run in OUT even where its options differ (one with equal options always is)
    restart: bool = False  # replace the run in OUT (finished or not) with a new one
    allow_unverified: bool = False  # load input checkpoints that have no checksum (with a warning)
    epochs: float = 10
    batch_size: int = 256  # global batch (all processes together)
    accumulate: int = 1  # micro-batches per batch (gradient accumulation): the same update in 1/K of the activations
    lr: float = 0.1  # base learning rate, scaled by lr_scaling
    lr_scaling: str = "sqrt"  # sqrt (lr·√B) | linear (lr·B/256) | none
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "lars"  # lars | sgd
    label_fraction: float | None = 0.01
    labels_per_class: int | None = None
    subset_file: str | None = None
    val_size: int = 0  # training images held out (class-balanced, seeded) as a validation split; 0 = none
    sync_bn: bool = True  # global BatchNorm across processes
    min_steps: int = 0  # at least this many optimiser steps (classifier stages: MIN_STEPS; 0 = exactly --epochs)
    checkpoint_every: int = 200  # steps
    log_every: int = 50  # steps
    eval_batch_size: int = 500


@dataclass
class PretrainConfig(RunConfig):
    epochs: float = 100
    batch_size: int = 512
    lr: float = 0.1
    lr_scaling: str = "sqrt"
    warmup_fraction: float = 0.05
    weight_decay: float = 1e-4
    depth: int = 50
    width: float = 1.0
    sk: bool = False
    stem: str = "auto"  # auto (small at <= 32 px) | small (3x3 stride 1, no max pool) | imagenet (7x7/2 + max pool)
    head_layers: int = 3
    proj_dim: int = 128
    temperature: float = 0.1
    color_strength: float = 1.0
    blur: bool = True
    crop_min: float = 0.08
    memory_size: int = 0  # 0: off; else the FIFO queue length of EMA keys (MoCo-style)
    memory_decay: float = 0.999
    probe: bool = True  # online linear probe on stop-gradient features (labeled subset)
    probe_lr_scale: float = 0.01  # the probe's lr relative to the encoder's (monitoring only; few labels per batch)
    knn_every: float = 1  # epochs between kNN evaluations on the test split (0: off)
    knn_k: int = 200
    knn_train_size: int = 10000


@dataclass
class FinetuneConfig(RunConfig):
    pretrained: str = ""
    head_layer: int | None = None  # None: 1 when labels <= 10%, else 0
    epochs: float = 60
    batch_size: int = 1024
    lr: float = 0.005
    lr_scaling: str = "sqrt"
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    crop_min: float = 0.08
    pad_crop: int = 0  # > 0: pad-and-crop instead of a resized crop (CIFAR-style)
    min_steps: int = MIN_STEPS  # at least this many optimiser steps (more epochs on a small labelled set)


@dataclass
class SupervisedConfig(RunConfig):
    """The baseline: the same classifier trained from scratch on the labeled subset only."""

    depth: int = 50
    width: float = 1.0
    sk: bool = False
    stem: str = "auto"
    epochs: float = 100
    batch_size: int = 256
    lr: float = 0.1
    lr_scaling: str = "linear"
    warmup_fraction: float = 0.05
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    crop_min: float = 0.08
    pad_crop: int = 0
    min_steps: int = MIN_STEPS


@dataclass
class DistillConfig(RunConfig):
    teacher: str = ""
    depth: int | None = None  # student; None: the teacher's (self-distillation)
    width: float | None = None
    sk: bool | None = None
    stem: str = "auto"
    temperature: float | None = None  # None: 0.1 for self-distillation, 1.0 for big-to-small
    alpha: float = 1.0  # weight of the distillation loss; 1 - alpha on the true labels
    init_from: str | None = None  # checkpoint to start the student from: a classifier of its architecture whole, else the encoder
    epochs: float = 400
    batch_size: int = 512
    lr: float = 0.1
    lr_scaling: str = "sqrt"
    warmup_fraction: float = 0.05
    weight_decay: float = 1e-4
    crop_min: float = 0.08
    pad_crop: int = 0
    min_steps: int = MIN_STEPS


@dataclass
class LinearEvalConfig(RunConfig):
    pretrained: str = ""
    head_layer: int = 0
    epochs: float = 90
    batch_size: int = 512
    lr: float = 0.1
    lr_scaling: str = "linear"
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    label_fraction: float | None = 1.0
    crop_min: float = 0.08
    pad_crop: int = 0
    min_steps: int = MIN_STEPS
    feature_norm: str = "auto"  # auto | on | off: a BatchNorm (no affine) before the classifier (stages/classify.py)


STAGE_CONFIGS = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "supervised": SupervisedConfig,
    "distill": DistillConfig,
    "linear_eval": LinearEvalConfig,
}


def _check_types(cfg: RunConfig) -> None:
    """Values from presets and --set arrive as YAML: check (and where exact, convert) each one's type."""
    for f in fields(cfg):
        kinds = str(f.type).replace(" ", "").split("|")
        v = getattr(cfg, f.name)
        if v is None and "None" in kinds:
            continue
        base = kinds[0]
        ok = True
        if base == "bool":
            ok = isinstance(v, bool)
        elif base == "int":
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif base == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif base == "str":
            ok = isinstance(v, str)
        if not ok:
            expected = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}.get(base, base)
            _bad(f.name, f"must be {expected}, got {v!r}")
        setattr(cfg, f.name, v)


def _bad(opt: str, msg: str) -> None:
    raise ConfigError(f"--{opt.replace('_', '-')} {msg}")


def check_sk(depth: int, sk: bool | None) -> None:
    """``--sk`` asks for selective kernels, which only the bottleneck blocks of ResNet-50/101/152 have
    (models/resnet.py): on ResNet-18/34 it would quietly give only the ResNet-D shortcuts."""
    if sk and depth < 50:
        _bad("sk", f"needs a bottleneck ResNet (--depth 50, 101 or 152): depth {depth} has no selective kernels")


def validate(cfg: RunConfig) -> None:
    """Cheap checks of option values, before any work starts."""
    if isinstance(cfg.bit_depth, int) and not isinstance(cfg.bit_depth, bool):  # --set bit_depth=12 (YAML int)
        cfg.bit_depth = str(cfg.bit_depth)
    _check_types(cfg)
    for f in fields(cfg):  # numbers must be numbers: no NaN or infinity
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            _bad(f.name, f"must be a finite number, got {v}")
    if not 0 <= cfg.seed < 2**63:
        _bad("seed", f"must be in [0, 2**63), got {cfg.seed}")
    if not 0 <= cfg.workers <= 256:
        _bad("workers", f"must be between 0 and 256, got {cfg.workers}")
    for name in ("checkpoint_every", "log_every", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            _bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.bit_depth not in BIT_DEPTH_CHOICES:
        _bad("bit_depth", f"must be one of {', '.join(BIT_DEPTH_CHOICES)}, got {cfg.bit_depth!r}")
    if not 1 <= cfg.decode_scale <= 8:
        _bad("decode_scale", f"must be between 1 and 8 (times --image-size), got {cfg.decode_scale}")
    if cfg.image_cache_gb < 0:
        _bad("image_cache_gb", f"must be >= 0 (0: no cache), got {cfg.image_cache_gb}")
    if getattr(cfg, "stem", "auto") not in STEMS:
        _bad("stem", f"must be one of {', '.join(STEMS)}, got {cfg.stem!r}")
    if getattr(cfg, "feature_norm", "auto") not in FEATURE_NORMS:
        _bad("feature_norm", f"must be one of {', '.join(FEATURE_NORMS)}, got {cfg.feature_norm!r}")
    if getattr(cfg, "min_steps", 0) < 0:
        _bad("min_steps", f"must be >= 0, got {cfg.min_steps}")
    if cfg.image_size is not None and not 8 <= cfg.image_size <= 4096:
        _bad("image_size", f"must be between 8 and 4096, got {cfg.image_size}")
    if cfg.epochs > MAX_EPOCHS:
        _bad("epochs", f"must be at most {MAX_EPOCHS}, got {cfg.epochs}")
    if cfg.label_fraction is not None and not 0 < cfg.label_fraction <= 1:
        _bad("label_fraction", f"must be in (0, 1], got {cfg.label_fraction}")
    if cfg.val_size < 0:
        _bad("val_size", f"must be >= 0, got {cfg.val_size}")
    if cfg.labels_per_class is not None and cfg.labels_per_class < 1:
        _bad("labels_per_class", f"must be >= 1, got {cfg.labels_per_class}")
    if cfg.epochs <= 0:
        _bad("epochs", f"must be > 0, got {cfg.epochs}")
    if cfg.batch_size < 2:
        _bad("batch_size", f"must be >= 2, got {cfg.batch_size}")
    if cfg.accumulate < 1:
        _bad("accumulate", f"must be >= 1 (1: no accumulation), got {cfg.accumulate}")
    if cfg.batch_size % cfg.accumulate:
        _bad("accumulate", f"{cfg.accumulate} does not divide --batch-size {cfg.batch_size} into equal micro-batches; "
                          f"expected a divisor of {cfg.batch_size}")
    if cfg.lr < 0:
        _bad("lr", f"must be >= 0, got {cfg.lr}")
    if cfg.lr_scaling not in ("sqrt", "linear", "none"):
        _bad("lr_scaling", f"must be sqrt, linear or none, got {cfg.lr_scaling!r}")
    if cfg.optimizer not in ("lars", "sgd"):
        _bad("optimizer", f"must be lars or sgd, got {cfg.optimizer!r}")
    if cfg.precision not in PRECISIONS:
        _bad("precision", f"must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got {cfg.precision!r}")
    if not 0 < cfg.dist_timeout <= 7 * 86400:
        _bad("dist_timeout", f"must be between 0 and 604800 seconds, got {cfg.dist_timeout}")
    if not 0 <= cfg.warmup_fraction < 1:
        _bad("warmup_fraction", f"must be in [0, 1), got {cfg.warmup_fraction}")
    if cfg.weight_decay < 0:
        _bad("weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    t = getattr(cfg, "temperature", None)
    if t is not None and t <= 0:
        _bad("temperature", f"must be > 0, got {t}")
    if getattr(cfg, "crop_min", 0.5) is not None and not 0 < getattr(cfg, "crop_min", 0.5) <= 1:
        _bad("crop_min", f"must be in (0, 1], got {cfg.crop_min}")
    if isinstance(cfg, DistillConfig) and not 0 <= cfg.alpha <= 1:
        _bad("alpha", f"must be in [0, 1], got {cfg.alpha}")
    if not 0 <= getattr(cfg, "pad_crop", 0) <= 64:
        _bad("pad_crop", f"must be between 0 and 64 pixels, got {cfg.pad_crop}")
    head_layer = getattr(cfg, "head_layer", None)
    if head_layer is not None and not 0 <= head_layer <= 4:
        _bad("head_layer", f"{head_layer} is not available; expected 0 to 4 (at most the pretrained head's layers)")
    if isinstance(cfg, PretrainConfig):
        _validate_pretrain(cfg)
    _validate_model(cfg)


def _validate_pretrain(cfg: PretrainConfig) -> None:
    if not 0 <= cfg.head_layers <= 4:
        _bad("head_layers", f"{cfg.head_layers} is not supported; expected 0 to 4")
    for name in ("proj_dim", "knn_k", "knn_train_size"):
        if getattr(cfg, name) < 1:
            _bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.proj_dim > 65536:
        _bad("proj_dim", f"must be at most 65536, got {cfg.proj_dim}")
    if cfg.knn_every < 0:
        _bad("knn_every", f"must be >= 0, got {cfg.knn_every}")
    if cfg.color_strength < 0:
        _bad("color_strength", f"must be >= 0, got {cfg.color_strength}")
    if not 0 <= cfg.memory_size <= 2**24:
        _bad("memory_size", f"must be between 0 (off) and {2**24}, got {cfg.memory_size}")
    if not 0 <= cfg.memory_decay < 1:
        _bad("memory_decay", f"must be in [0, 1), got {cfg.memory_decay}")
    if not 0 <= cfg.probe_lr_scale <= 1e3:
        _bad("probe_lr_scale", f"must be between 0 and 1000, got {cfg.probe_lr_scale}")


def _validate_model(cfg: RunConfig) -> None:
    """The encoder options of the stages that build one (a distillation student's may be None: the teacher's)."""
    d = getattr(cfg, "depth", None)
    if d is not None:
        if d not in (18, 34, 50, 101, 152):
            _bad("depth", f"{d} is not supported; expected one of 18, 34, 50, 101, 152")
        check_sk(d, getattr(cfg, "sk", None))
    w = getattr(cfg, "width", None)
    if w is not None and not (0 < w <= MAX_WIDTH and round(64 * w) >= 1):
        _bad("width", f"{w} is not supported; expected a positive multiplier up to {MAX_WIDTH:g}, such as 0.25, 1, 2, 3")


# ---------------------------------------------------------------- commands that use trained models

# Their defaults, in one place: the CLI, the Python API (simclrv2.evaluate, ...) and the functions
# themselves (stages.evaluate, inference.*) read them from here.
EVALUATE_DEFAULTS = {"split": "test", "device": "auto", "precision": "auto", "batch_size": 500, "workers": 2}
INFERENCE_DEFAULTS = {"batch_size": 256, "device": "auto", "precision": "fp32"}  # embed, predict
IMPORT_TF_DEFAULTS = {"image_size": 224}


# ---------------------------------------------------------------- presets

def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("simclrv2.presets").iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """A shipped preset's purpose: the first comment line of its YAML file."""
    for line in resources.files("simclrv2.presets").joinpath(f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_preset(name_or_path: str | None) -> dict[str, Any]:
    if not name_or_path:
        return {}
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    else:
        candidates = preset_names()
        if name_or_path not in candidates:
            raise ConfigError(f"--preset {name_or_path!r} is unknown; expected one of {', '.join(candidates)} or a .yaml file")
        text = resources.files("simclrv2.presets").joinpath(f"{name_or_path}.yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--preset {name_or_path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--preset {name_or_path}: expected a mapping at the top level")
    check_preset(data, f"--preset {name_or_path}")
    return data


# the pipeline's own keys (pipeline.py), beside the stage sections and the options shared by stages
PIPELINE_KEYS = ("label_fractions", "model", "student", "distill_init", "finetune_head_layers", "fractions",
                 "self_distill", "supervised_model")
MODEL_KEYS = ("depth", "width", "sk")


def preset_students(preset: dict[str, Any]) -> list[dict[str, Any]]:
    """The preset's big-to-small students (``student``: one architecture or a list of them), in order."""
    student = preset.get("student")
    return [] if not student else list(student) if isinstance(student, list) else [student]
SECTIONS = {**{stage: stage for stage in STAGE_CONFIGS}, "distill_small": "distill"}  # section -> its stage's options


def _nearest(name: str, candidates) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_section(section: str, values: Any, source: str) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping of options, got {values!r}")
    names = {f.name for f in fields(STAGE_CONFIGS[SECTIONS[section]])}
    for key in values:
        if key not in names:
            raise ConfigError(f"{source}: {section}.{key} is not an option of {SECTIONS[section]}{_nearest(key, names)}")


def check_preset(preset: dict[str, Any], source: str) -> None:
    """Every key of a preset (or of pipeline --set overrides) is known: a stage section and its
    options, a pipeline key, or an option some stage has (shared by every stage that has it).
    A misspelt key is a ConfigError naming it and the nearest valid name, never silently unused."""
    shared = {f.name for cls in STAGE_CONFIGS.values() for f in fields(cls)}
    for key, value in preset.items():
        if key in SECTIONS:
            _check_section(key, value, source)
        elif key in ("model", "student"):
            archs = value if key == "student" and isinstance(value, list) else [value]
            for arch in archs:
                if arch is not None and (not isinstance(arch, dict) or set(arch) - set(MODEL_KEYS)):
                    bad = sorted(set(arch) - set(MODEL_KEYS)) if isinstance(arch, dict) else arch
                    raise ConfigError(f"{source}: {key} takes {', '.join(MODEL_KEYS)}"
                                      f"{' (or, for student, a list of such)' if key == 'student' else ''}; got {bad}")
        elif key == "self_distill" and not isinstance(value, bool):
            raise ConfigError(f"{source}: self_distill must be true or false, got {value!r}")
        elif key == "supervised_model" and value not in ("model", "student"):
            raise ConfigError(f"{source}: supervised_model must be model or student, got {value!r}")
        elif key == "fractions":
            for fraction, sections in (value or {}).items():
                for section, values in (sections or {}).items():
                    if section not in SECTIONS:
                        raise ConfigError(f"{source}: fractions.{fraction}.{section} is not a stage section"
                                          f"{_nearest(section, SECTIONS)}")
                    _check_section(section, values, f"{source} (fractions.{fraction})")
        elif key not in PIPELINE_KEYS and key not in shared:
            raise ConfigError(f"{source}: unknown key {key!r}{_nearest(key, [*SECTIONS, *PIPELINE_KEYS, *shared])}")


def stage_values(preset: dict[str, Any], stage: str) -> dict[str, Any]:
    """A stage's view of a preset: shared top-level scalars, the preset's ``model`` (depth, width,
    sk: the encoder it trains from scratch; not for distill, whose student defaults to the
    teacher's architecture), then the stage's own section."""
    cls = STAGE_CONFIGS[stage]
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in preset.items() if k in names and not isinstance(v, dict)}
    if stage != "distill":
        values.update({k: v for k, v in (preset.get("model") or {}).items() if k in names})
    section = preset.get(stage) or {}
    _check_section(stage, section, "preset")
    values.update(section)
    return values


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_layout(values: dict, explicit: dict) -> None:
    """Config values (preset + options) naming image folders: the dataset is ``imagefolder`` and a
    labelled folder's labels are all used unless a fraction / count / subset file is asked for.
    ``explicit``: the options given by the caller (an explicit other dataset, or --data-dir, is an error)."""
    given = [flag(k) for k in FOLDER_OPTIONS if values.get(k)]
    if not given:
        return
    if explicit.get("dataset") not in (None, "imagefolder", "image-folder", "image_folder"):
        raise ConfigError(f"--dataset {explicit['dataset']} cannot be combined with {', '.join(given)} (your own "
                          "image folders); leave --dataset out")
    if values.get("data_dir"):
        raise ConfigError(f"--data-dir {values['data_dir']} (the ROOT/train/CLASS layout) cannot be combined with "
                          f"{', '.join(given)}; give the folders alone")
    values["dataset"] = "imagefolder"
    if values.get("labeled_dir") and all(values.get(k) is None for k in ("label_fraction", "labels_per_class",
                                                                           "subset_file")):
        values["label_fraction"] = 1.0  # the labelled folder is the labelled set: every label is used


def _pipeline_choices(preset: dict[str, Any], stage: str, values: dict[str, Any], explicit: dict[str, Any]) -> None:
    """What the pipeline does for this stage, so that a stage run alone with ``--preset P`` does the
    same: the preset's per-fraction section for the run's label fraction, the first of
    ``finetune_head_layers``, and ``distill_init: teacher`` for self-distillation (a student of the
    teacher's architecture, i.e. none given, starts as its teacher)."""
    by_fraction = {float(k): v for k, v in (preset.get("fractions") or {}).items()}
    arch_given = bool(set(MODEL_KEYS) & set(explicit))
    students = preset_students(preset)
    section_name = stage
    if stage == "supervised" and preset.get("supervised_model") == "student" and students and not arch_given:
        values.update(students[0])  # the baseline has the deployed student's architecture
    if stage == "distill" and preset.get("self_distill") is False and students and not arch_given:
        section_name = "distill_small"  # no self-distillation: distill is the big-to-small step into the first student
        values.update(preset.get("distill_small") or {})
        values.update(students[0])
    fraction = values.get("label_fraction")
    if fraction is not None:
        section = (by_fraction.get(float(fraction)) or {}).get(section_name) or {}
        _check_section(section_name, section, f"preset fractions.{fraction:g}")
        values.update(section)
    if stage == "finetune" and values.get("head_layer") is None and preset.get("finetune_head_layers"):
        values["head_layer"] = preset["finetune_head_layers"][0]
    if (stage == "distill" and section_name == "distill" and values.get("init_from") is None
            and preset.get("distill_init") == "teacher" and not arch_given):
        values["init_from"] = values.get("teacher")


def auto_workers() -> int:
    """``workers: auto``: the CPU cores this process may use, shared by the processes of this machine
    (torchrun's ``LOCAL_WORLD_SIZE``), less one for the training process itself; at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


def make_config(stage: str, preset: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    cls = STAGE_CONFIGS[stage]
    preset = preset or {}
    values = stage_values(preset, stage)
    explicit = {k: v for k, v in overrides.items() if v is not None}
    values.update(explicit)
    resolve_layout(values, explicit)  # (before the per-fraction choices: a labelled folder's fraction is 1)
    _pipeline_choices(preset, stage, values, explicit)
    values.update(explicit)  # explicit options win
    if values.get("workers") == "auto":
        values["workers"] = auto_workers()
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{stage}: unknown option(s) {', '.join(sorted(unknown))}")
    cfg = cls(**values)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "DistillConfig", "FinetuneConfig", "LinearEvalConfig", "PretrainConfig", "RunConfig", "STAGE_CONFIGS",
    "SupervisedConfig", "dump", "field", "load_preset", "make_config", "preset_names", "stage_values", "to_dict", "validate",
]
