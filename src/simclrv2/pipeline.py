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
from pathlib import Path
from typing import Any

import yaml

from simclrv2 import checkpoint as ckpt
from simclrv2.config import check_preset, load_preset, make_config
from simclrv2.distributed import is_main_process
from simclrv2.errors import ConfigError
from simclrv2.report import model_name, pipeline_feature_map, write_report
from simclrv2.runtime import log

MODEL_KEYS = ("depth", "width", "sk")
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
                 device: str | None = None, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the report (also written to OUT/report.json and OUT/report.md).

    ``stages``: run only these (default: all); the others are reused when finished in OUT, else skipped,
    and then the report is not written (the returned dict lists what is missing). A pipeline that fails
    before any stage began training leaves no trace in a --out it created (each stage undoes its own
    failed start; this removes pipeline.yaml and the directories)."""
    path = Path(out).absolute()
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    had_yaml = (path / "pipeline.yaml").exists()
    try:
        return _run_pipeline(preset_name, out, dataset, data_dir, label_fractions, overrides, device, stages)
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


def _run_pipeline(preset_name: str, out: str | Path, dataset: str | None, data_dir: str | None,
                  label_fractions: list[float] | None, overrides: dict[str, Any] | None, device: str | None,
                  stages: list[str] | None) -> dict[str, Any]:
    from simclrv2.stages import distill, finetune, linear_eval, pretrain, supervised
    from simclrv2.stages.common import stage_done

    check_preset(overrides or {}, "--set")
    preset = merge(load_preset(preset_name), overrides or {})
    if dataset:
        preset["dataset"] = dataset
    if data_dir:
        preset["data_dir"] = data_dir
    if device:
        preset["device"] = device
    fractions = label_fractions or preset.get("label_fractions") or [0.01]
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"--label-fraction must be in (0, 1], got {f}")
    selected = list(stages or STAGES)
    unknown = sorted(set(selected) - set(STAGES))
    if unknown:
        raise ConfigError(f"--stages: unknown {unknown}; expected some of {', '.join(STAGES)}")
    model = preset.get("model") or {}

    student = preset.get("student")
    unknown = set(model) - set(MODEL_KEYS) | (set(student or {}) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"preset model/student: unknown keys {sorted(unknown)}; expected {MODEL_KEYS}")
    out = Path(out)
    head_layers = preset.get("finetune_head_layers") or [None]

    by_fraction = {float(k): v for k, v in (preset.get("fractions") or {}).items()}
    init = preset.get("distill_init", "none")
    if init not in ("none", "teacher", "pretrained"):
        raise ConfigError(f"preset distill_init must be none, teacher or pretrained; got {init!r}")

    def cfg(stage: str, section: str | None = None, **kw):
        """A stage's config: preset section (+ its variant section, + per-fraction overrides) + kw."""
        values = dict(preset)
        merged = dict(preset.get(stage) or {})
        if section and section != stage:
            merged.update(preset.get(section) or {})
        fraction = kw.get("label_fraction")
        merged.update((by_fraction.get(fraction) or {}).get(section or stage) or {})
        values[stage] = merged
        # (the stage itself reuses its run when finished in an earlier run with the same options, and continues it
        # from its last checkpoint, or its final one when stopped before storing the result, when interrupted)
        return make_config(stage, values, **kw)

    # Validate every stage's options before any work starts.
    first = fractions[0]
    configs = [cfg("pretrain", out=str(out / "pretrain"), label_fraction=min(fractions), **model),
               cfg("supervised", out="x", label_fraction=first, **model),
               cfg("finetune", out="x", pretrained="x", label_fraction=first),
               cfg("distill", out="x", teacher="x", label_fraction=first),
               cfg("linear_eval", out="x", pretrained="x", label_fraction=first)]
    if student:
        configs.append(cfg("distill", "distill_small", out="x", teacher="x", label_fraction=first, **student))
    resolved = {"preset": preset_name, "label_fractions": fractions, **preset}
    main = is_main_process()  # under torchrun only rank 0 writes files
    if main:
        ckpt.atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(resolved, sort_keys=False))

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    curves: dict[str, str] = {}
    missing: list[str] = []

    def run(stage: str, fn, config, needs: Path | None = None) -> dict[str, Any] | None:
        """The stage's result: trained (selected), reused (finished in OUT), or None (skipped)."""
        stage_dir = Path(config.out)
        if stage not in selected:
            done = stage_done(stage_dir)
            if done is None:
                missing.append(str(stage_dir))
                return None
            return done.result
        if needs is not None and stage_done(needs) is None:
            raise ConfigError(f"--stages {stage}: needs the finished {NEEDS[stage]} stage in {needs}; "
                              f"run the pipeline with --stages {NEEDS[stage]} first (same --out)")
        try:
            return fn(config)
        except ConfigError as e:
            if "--restart" not in str(e):
                raise
            # a stage directory holding a run with other options: the pipeline's spelling of the stage's flags
            flags = " or ".join(f"--set {stage}.{f}=true" for f in ("resume", "restart") if f"--{f}" in str(e))
            raise ConfigError(f"{e} (in a pipeline: {flags})") from None

    def add(stage: str, res: dict[str, Any] | None, stage_dir: Path, fraction: float, variant: str | None = None):
        if res is None:
            return
        meta = ckpt.read_meta(stage_dir / "final.safetensors")
        row = {"stage": stage, "model": model_name(meta.model), "params": int(res["params"]),
               "label_fraction": float(fraction), "top1": float(res["top1"]), "top5": float(res["top5"]),
               "seconds": float(res["seconds"])}
        if variant:
            row["variant"] = variant
        results.append(row)
        curves[f"{stage}{'-' + variant if variant else ''} @ {fraction:g}"] = str(stage_dir / "metrics.jsonl")

    log.info(f"pipeline: {preset.get('dataset', 'fashion-mnist')}, label fractions {fractions}, preset {preset_name}")
    pre_cfg = configs[0]
    pre = run("pretrain", pretrain, pre_cfg)
    curves["pretrain"] = str(out / "pretrain" / "metrics.jsonl")
    for f in fractions:
        fdir = out / f"labels_{f:g}"
        sup_dir = fdir / "supervised"
        add("supervised", run("supervised", supervised, cfg("supervised", out=str(sup_dir), label_fraction=f, **model)),
            sup_dir, f)
        lin_dir = fdir / "linear_eval"
        add("pretrain_linear", run("linear_eval", linear_eval, cfg("linear_eval", out=str(lin_dir),
                                   pretrained=str(out / "pretrain"), label_fraction=f), out / "pretrain"), lin_dir, f)
        teacher_dir = None
        for k in head_layers:
            name = "finetune" if k is None or k == head_layers[0] else f"finetune_head{k}"
            ft_dir = fdir / name
            res = run("finetune", finetune, cfg("finetune", out=str(ft_dir), pretrained=str(out / "pretrain"),
                                                label_fraction=f, head_layer=k), out / "pretrain")
            if res is not None:
                layer = ckpt.read_meta(ft_dir / "final.safetensors").model.head_layer
                add("finetune", res, ft_dir, f, variant=f"head layer {layer}")
            teacher_dir = teacher_dir or ft_dir
        self_dir = fdir / "distill_self"
        init_from = {"none": None, "teacher": str(teacher_dir), "pretrained": str(out / "pretrain")}[init]
        add("distill", run("distill", distill, cfg("distill", out=str(self_dir), teacher=str(teacher_dir),
                                                   label_fraction=f, init_from=init_from), teacher_dir),
            self_dir, f, variant="self")
        if student:
            small_dir = fdir / "distill_small"
            # the small student learns from the self-distilled model
            add("distill", run("distill", distill, cfg("distill", "distill_small", out=str(small_dir),
                                                       teacher=str(self_dir), label_fraction=f, **student)),
                small_dir, f, variant="big-to-small")

    if missing:
        log.info(f"pipeline: report not written: {len(missing)} stage(s) not finished yet ({', '.join(missing)})")
        return {"out": str(out), "stages": selected, "results": results, "not_finished": missing}

    report = {"dataset": pre_cfg.dataset, "preset": str(preset_name), "results": results,
              "pretrain": {"model": model_name(ckpt.read_meta(out / "pretrain" / "final.safetensors").model),
                           "knn_top1": pre.get("knn"), "seconds": pre.get("seconds"), "params": pre.get("params")},
              "total_seconds": time.perf_counter() - started}
    # a 2-D map (t-SNE) of the final self-distilled model's test-set features, coloured by class (rank 0 only)
    if main:
        report["feature_map"] = pipeline_feature_map(out, self_dir, pre_cfg.dataset, pre_cfg.data_dir)
        write_report(out, report, curves)
    log.info(f"pipeline: report written to {out / 'report.md'}")
    return json.loads(json.dumps(report))
