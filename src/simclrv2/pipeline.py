"""`simclrv2 pipeline`: the whole recipe for each label fraction, then a report.

For each label fraction: supervised baseline, (one shared) pretraining, linear evaluation of the
pretrained encoder, fine-tuning, self-distillation, and big-to-small distillation when the preset
names a student. Any stage whose finished output is already in OUT is reused, so an interrupted
pipeline is simply run again. ``stages`` runs only some of them (e.g. the supervised baselines on
one machine while another pretrains, into the same OUT); the report is written once every stage's
result is in OUT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simclrv2 import checkpoint as ckpt
from simclrv2.config import (FOLDER_OPTIONS, MODEL_KEYS, check_preset, flag, load_preset, make_config, preset_students,
                             resolve_layout)
from simclrv2.distributed import is_main_process
from simclrv2.errors import ConfigError
from simclrv2.feature_map import pipeline_feature_map
from simclrv2.report import model_name, write_report
from simclrv2.runtime import log

STAGES = ("supervised", "pretrain", "linear_eval", "finetune", "distill")
# the stage whose finished output a stage starts from
NEEDS = {"linear_eval": "pretrain", "finetune": "pretrain", "distill": "finetune"}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['pretrain.epochs=5', 'seed=1'] -> {'pretrain': {'epochs': 5}, 'seed': 1} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected STAGE.OPTION=VALUE or OPTION=VALUE")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value else None
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name.replace("-", "_")] = parsed
        else:
            out[key.replace("-", "_")] = parsed
    return out


def merge(preset: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.items()}
    for k, v in overrides.items():
        if isinstance(v, dict):
            merged.setdefault(k, {})
            merged[k] = {**(merged[k] or {}), **v}
        else:
            merged[k] = v
    return merged


def run_pipeline(preset_name: str, out: str | Path, dataset: str | None = None, data_dir: str | None = None,
                 label_fractions: list[float] | None = None, overrides: dict[str, Any] | None = None,
                 device: str | None = None, stages: list[str] | None = None, unlabeled_dir: str | None = None,
                 labeled_dir: str | None = None, test_dir: str | None = None) -> dict[str, Any]:
    """Run the recipe; returns the report (also written to OUT/report.json and OUT/report.md).

    ``stages``: run only these (default: all); the others are reused when finished in OUT, else skipped,
    and then the report is not written (the returned dict lists what is missing). A pipeline that fails
    before any stage began training leaves no trace in a --out it created (each stage undoes its own
    failed start; this removes pipeline.yaml and the directories)."""
    path = Path(out).absolute()
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    had_yaml = (path / "pipeline.yaml").exists()
    try:
        folders = {"unlabeled_dir": unlabeled_dir, "labeled_dir": labeled_dir, "test_dir": test_dir}
        return _run_pipeline(preset_name, out, dataset, data_dir, label_fractions, overrides, device, stages, folders)
    except BaseException:
        if is_main_process() and not had_yaml and path.is_dir() \
                and not any(p.is_dir() for p in path.iterdir()):
            (path / "pipeline.yaml").unlink(missing_ok=True)
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
        raise


@dataclass
class Node:
    """One stage run of the pipeline: its validated config (``config.out`` is its directory), the
    nodes whose finished output it reads, and how the report lists it (None: not a report row)."""

    stage: str  # the stage function: one of STAGES
    config: Any  # the stage's RunConfig
    needs: tuple[str, ...] = ()  # directories of the nodes it starts from
    row: tuple[str, str | None] | None = None  # (report stage name, variant)
    fraction: float | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def plan(preset: dict[str, Any], fractions: list[float], out: Path) -> list[Node]:
    """The stage graph, in the order it runs: one pretraining, then per label fraction the supervised
    baseline (of the preset's ``model``, or with ``supervised_model: student`` of the first
    student's architecture), linear evaluation, fine-tuning (once per head layer; the first is the
    teacher), self-distillation (unless ``self_distill: false``) and big-to-small distillation into
    each ``student`` (one architecture or a list), from the self-distilled model or else the teacher.
    Every stage's config is built here, so a bad option fails before any work starts."""
    model = preset.get("model") or {}
    students = preset_students(preset)
    unknown = set(model).union(*students) - set(MODEL_KEYS)
    if unknown:
        raise ConfigError(f"preset model/student: unknown keys {sorted(unknown)}; expected {MODEL_KEYS}")
    self_distill = preset.get("self_distill", True)
    baseline = students[0] if preset.get("supervised_model") == "student" and students else model
    init = preset.get("distill_init", "none")
    if init not in ("none", "teacher", "pretrained"):
        raise ConfigError(f"preset distill_init must be none, teacher or pretrained; got {init!r}")
    head_layers = preset.get("finetune_head_layers") or [None]
    by_fraction = {float(k): v for k, v in (preset.get("fractions") or {}).items()}

    def cfg(stage: str, section: str | None = None, **kw):
        """A stage's config: preset section (+ its variant section, + per-fraction overrides) + kw."""
        # (the graph makes the pipeline-level choices itself: per node, not per stage kind)
        values = {k: v for k, v in preset.items()
                  if k not in ("fractions", "distill_init", "finetune_head_layers", "self_distill", "supervised_model")}
        merged = dict(preset.get(stage) or {})
        if section and section != stage:
            merged.update(preset.get(section) or {})
        merged.update((by_fraction.get(kw.get("label_fraction")) or {}).get(section or stage) or {})
        values[stage] = merged
        return make_config(stage, values, **kw)

    pre = str(out / "pretrain")
    nodes = [Node("pretrain", cfg("pretrain", out=pre, label_fraction=min(fractions), **model))]
    for f in fractions:
        fdir = out / f"labels_{f:g}"
        nodes.append(Node("supervised", cfg("supervised", out=str(fdir / "supervised"), label_fraction=f, **baseline),
                          row=("supervised", None), fraction=f))
        nodes.append(Node("linear_eval", cfg("linear_eval", out=str(fdir / "linear_eval"), pretrained=pre, label_fraction=f),
                          needs=(pre,), row=("pretrain_linear", None), fraction=f))
        for k in head_layers:
            name = "finetune" if k is None or k == head_layers[0] else f"finetune_head{k}"
            nodes.append(Node("finetune", cfg("finetune", out=str(fdir / name), pretrained=pre, label_fraction=f,
                                              head_layer=k), needs=(pre,), row=("finetune", "head layer"), fraction=f))
        teacher = str(fdir / "finetune")  # the first head layer's fine-tuned model
        init_from = {"none": None, "teacher": teacher, "pretrained": pre}[init]
        source = teacher
        if self_distill:
            source = str(fdir / "distill_self")
            nodes.append(Node("distill", cfg("distill", out=source, teacher=teacher, label_fraction=f, init_from=init_from),
                              needs=(teacher,), row=("distill", "self"), fraction=f))
        for i, student in enumerate(students):  # the small students learn from the self-distilled model (or the teacher)
            sdir = str(fdir / ("distill_small" if i == 0 else f"distill_small{i + 1}"))
            nodes.append(Node("distill", cfg("distill", "distill_small", out=sdir, teacher=source, label_fraction=f,
                                             **student), needs=(source,), row=("distill", "big-to-small"), fraction=f))
    return nodes


def _run_pipeline(preset_name: str, out: str | Path, dataset: str | None, data_dir: str | None,
                  label_fractions: list[float] | None, overrides: dict[str, Any] | None, device: str | None,
                  stages: list[str] | None, folders: dict[str, str | None]) -> dict[str, Any]:
    from simclrv2 import stages as stage_functions
    from simclrv2.stages.common import stage_done

    check_preset(overrides or {}, "--set")
    preset = merge(load_preset(preset_name), overrides or {})
    for key, value in (("dataset", dataset), ("data_dir", data_dir), ("device", device)):
        if value:
            preset[key] = value
    preset.update({k: str(v) for k, v in folders.items() if v})
    if any(preset.get(k) for k in FOLDER_OPTIONS):  # your own folders: the recipe needs labels and test images
        resolve_layout(dict(preset), {"dataset": dataset})  # (an explicit other --dataset / --data-dir is an error)
        preset["dataset"] = "imagefolder"
        for name, what in (("labeled_dir", "the labelled images, DIR/CLASS/*"),
                           ("test_dir", "held-out labelled images, DIR/CLASS/*, for the report's accuracies")):
            if not preset.get(name):
                raise ConfigError(f"pipeline: {flag(name)} is required with your own image folders ({what})")
        # the labelled folder is the labelled set: all of it unless --label-fraction asks for less
        fractions = label_fractions or [1.0]
    else:
        fractions = label_fractions or preset.get("label_fractions") or [0.01]
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"--label-fraction must be in (0, 1], got {f}")
    selected = list(stages or STAGES)
    unknown = sorted(set(selected) - set(STAGES))
    if unknown:
        raise ConfigError(f"--stages: unknown {unknown}; expected some of {', '.join(STAGES)}")
    out = Path(out)
    graph = plan(preset, fractions, out)
    main = is_main_process()  # under torchrun only rank 0 writes files
    if main:
        resolved = {"preset": preset_name, "label_fractions": fractions, **preset}
        ckpt.atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(resolved, sort_keys=False))

    log.info(f"pipeline: {preset.get('dataset', 'fashion-mnist')}, label fractions {fractions}, preset {preset_name}")
    started = time.perf_counter()
    results: dict[Path, dict[str, Any]] = {}
    missing: list[str] = []
    for node in graph:
        res = _run_node(node, node.stage in selected, getattr(stage_functions, node.stage), stage_done)
        if res is None:
            missing.append(str(node.out))
        else:
            results[node.out] = res
    if missing:
        log.info(f"pipeline: report not written: {len(missing)} stage(s) not finished yet ({', '.join(missing)})")
        rows = [_row(n, results[n.out]) for n in graph if n.row and n.out in results]
        return {"out": str(out), "stages": selected, "results": rows, "not_finished": missing}

    pre_node = graph[0]
    pre = results[pre_node.out]
    report = {"dataset": pre_node.config.dataset, "preset": str(preset_name),
              "results": [_row(n, results[n.out]) for n in graph if n.row],
              "pretrain": {"model": model_name(ckpt.read_meta(pre_node.out / "final.safetensors").model),
                           "knn_top1": pre.get("knn"), "seconds": pre.get("seconds"), "params": pre.get("params")},
              "total_seconds": time.perf_counter() - started}
    curves = {"pretrain": str(pre_node.out / "metrics.jsonl")}
    for n in graph:
        if n.row:
            variant = _variant(n)
            key = f"{n.row[0]}{'-' + variant if variant else ''} @ {n.fraction:g}"
            if key in curves:  # a second student
                key = key.replace(" @", f" ({n.out.name}) @")
            curves[key] = str(n.out / "metrics.jsonl")
    if main:
        # a 2-D map (t-SNE) of the test-set features of the last label fraction's final model (self-distilled,
        # else the deployed student: the first big-to-small one), coloured by class
        last = [n for n in graph if n.row == ("distill", "self")] or [n for n in graph if n.out.name == "distill_small"]
        last = last or [n for n in graph if n.stage == "finetune"]
        report["feature_map"] = pipeline_feature_map(out, last[-1].out, pre_node.config.dataset, pre_node.config.data_dir)
        write_report(out, report, curves)
    log.info(f"pipeline: report written to {out / 'report.md'}")
    return json.loads(json.dumps(report))


def _run_node(node: Node, selected: bool, fn, stage_done) -> dict[str, Any] | None:
    """The node's result: trained (its stage selected), reused (finished in its directory), or None."""
    if not selected:
        done = stage_done(node.out)
        return None if done is None else done.result
    for need in node.needs:
        if stage_done(Path(need)) is None:
            raise ConfigError(f"--stages {node.stage}: needs the finished {NEEDS[node.stage]} stage in {need}; "
                              f"run the pipeline with --stages {NEEDS[node.stage]} first (same --out)")
    try:
        return fn(node.config)
    except ConfigError as e:
        if "--restart" not in str(e):
            raise
        # a stage directory holding a run with other options: the pipeline's spelling of the stage's flags
        flags = " or ".join(f"--set {node.stage}.{f}=true" for f in ("resume", "restart") if f"--{f}" in str(e))
        raise ConfigError(f"{e} (in a pipeline: {flags})") from None


def _variant(node: Node) -> str | None:
    variant = node.row[1]
    if variant == "head layer":  # the layer the stage resolved (a default depends on the label fraction)
        return f"head layer {ckpt.read_meta(node.out / 'final.safetensors').model.head_layer}"
    return variant


def _row(node: Node, res: dict[str, Any]) -> dict[str, Any]:
    meta = ckpt.read_meta(node.out / "final.safetensors")
    row = {"stage": node.row[0], "model": model_name(meta.model), "params": int(res["params"]),
           "label_fraction": float(node.fraction), "top1": float(res["top1"]), "top5": float(res["top5"]),
           "seconds": float(res["seconds"])}
    if res.get("val_top1") is not None:  # --val-size: accuracy on the validation images held out of the labels
        row.update(val_top1=float(res["val_top1"]), val_images=int(res.get("val_images") or 0))
    variant = _variant(node)
    if variant:
        row["variant"] = variant
    return row
