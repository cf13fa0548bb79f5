"""The `simclrv2` command and the pipeline, run as a user would."""

import json
import subprocess
import sys

import pytest
import torch

from simclrv2 import checkpoint as ckpt
from simclrv2.cli import main
from simclrv2.errors import ConfigError
from simclrv2.pipeline import parse_overrides, run_pipeline
from test_reliability import run


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "simclrv2", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_pipeline_tiny_writes_report_and_reuses_stages(tmp_path):
    out = tmp_path / "run"
    assert main(["-q", "pipeline", "--preset", "tiny", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "digits" and report["preset"] == "tiny"
    stages = [(r["stage"], r.get("variant")) for r in report["results"]]
    assert stages == [("supervised", None), ("pretrain_linear", None), ("finetune", "head layer 1"),
                      ("distill", "self"), ("distill", "big-to-small")]
    for r in report["results"]:
        assert set(r) >= {"stage", "model", "params", "label_fraction", "top1", "top5", "seconds"}
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["label_fraction"] == 0.1 and r["params"] > 0
    small = report["results"][-1]
    assert small["params"] < report["results"][3]["params"]
    md = (out / "report.md").read_text()
    assert "| method | architecture | params | label fraction | top-1 | top-5 | time |" in md
    for png in ("accuracy_vs_labels.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pretrain" / "config.yaml").exists() and (out / "labels_0.1" / "finetune" / "config.yaml").exists()

    # a second run finds every stage finished and reuses it: same numbers, no retraining
    mtime = (out / "pretrain" / "final.safetensors").stat().st_mtime_ns
    assert main(["-q", "pipeline", "--preset", "tiny", "--out", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [r["top1"] for r in again["results"]] == [r["top1"] for r in report["results"]]
    assert (out / "pretrain" / "final.safetensors").stat().st_mtime_ns == mtime

    # a stage interrupted before its end (final.* missing, last.* kept) is resumed, not restarted
    stage_dir = out / "labels_0.1" / "distill_self"
    for name in ("final.safetensors", "final.json"):
        (stage_dir / name).unlink()
    # (resumed at its last step, its logged rows are kept as they were; a fresh start would log them
    # again, with new images_per_s timings)
    rows = (stage_dir / "metrics.jsonl").read_text()
    assert main(["-q", "pipeline", "--preset", "tiny", "--out", str(out)]) == 0
    assert (stage_dir / "final.safetensors").exists() and (stage_dir / "metrics.jsonl").read_text() == rows
    third = json.loads((out / "report.json").read_text())
    assert [r["top1"] for r in third["results"]] == [r["top1"] for r in report["results"]]

    # a stage stopped after its final checkpoint but before it stored its result (killed during its closing
    # evaluation), last.* gone too: it is finished from final.*, not trained again from scratch
    pre = out / "pretrain"
    tensors, meta = ckpt.load_checkpoint(pre / "final.safetensors")
    ckpt.save_checkpoint(pre / "final", tensors, meta.replace(result=None))
    for name in ("last.safetensors", "last.json"):
        (pre / name).unlink()
    rows = (pre / "metrics.jsonl").read_text()
    assert main(["-q", "pipeline", "--preset", "tiny", "--out", str(out)]) == 0
    assert (pre / "metrics.jsonl").read_text() == rows  # a fresh start would have rewritten it
    finished, fmeta = ckpt.load_checkpoint(pre / "final.safetensors")
    assert fmeta.result["knn"] == report["pretrain"]["knn_top1"]
    assert all(torch.equal(finished[k], tensors[k]) for k in tensors)
    # its time is the training time of the run that did the work (plus this one's moment)
    assert 0 < meta.train_seconds <= fmeta.train_seconds < meta.train_seconds + 60


@pytest.mark.parametrize("args,needle", [
    (["pipeline", "--preset", "no-such-preset", "--out", "x"], "--preset 'no-such-preset' is unknown"),
    (["pipeline", "--preset", "tiny", "--out", "x", "--label-fraction", "1.5"], "--label-fraction"),
    (["supervised", "--out", "x", "--dataset", "digits", "--label-fraction", "-0.1"], "--label-fraction"),
    (["pretrain", "--out", "x", "--dataset", "digits", "--temperature", "0"], "--temperature must be > 0"),
    (["pretrain", "--out", "x", "--dataset", "digits", "--depth", "42"], "--depth 42 is not supported"),
    (["pretrain", "--out", "x", "--dataset", "digits", "--width", "-1"], "--width -1.0 is not supported"),
    (["supervised", "--out", "x", "--dataset", "digits", "--unlabeled-dir", "u"],
     "--dataset digits cannot be combined with --unlabeled-dir"),
    (["pipeline", "--preset", "tiny", "--out", "x", "--labeled-dir", "l"], "--test-dir is required"),
    (["finetune", "--out", "x", "--dataset", "digits", "--pretrained", "missing_dir"], "not found"),
    (["pretrain", "--out", "x", "--dataset", "cifar10", "--data-dir", "nowhere"], "nowhere"),
    (["pipeline", "--preset", "tiny", "--out", "x", "--set", "pretrain.no_such_option=1"], "no_such_option"),
])
def test_bad_options_give_one_line_errors(tmp_path, monkeypatch, args, needle):
    # in this process (the command's own entry point, `python -m simclrv2`, is run as a subprocess below)
    monkeypatch.chdir(tmp_path)
    rc, err = run(*args)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simclrv2: error:") and needle in lines[0], err
    assert not (tmp_path / "x" / "final.safetensors").exists()


def test_the_module_entry_point_gives_the_same_one_line_error(tmp_path):
    r = run_cli("pretrain", "--out", "x", "--dataset", "digits", "--temperature", "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "simclrv2: error: --temperature must be > 0, got 0.0", r.stderr


def test_help_lists_stage_options_and_presets():
    r = run_cli("pretrain", "--help")
    assert r.returncode == 0 and "--memory-size" in r.stdout and "--label-fraction" in r.stdout
    r = run_cli("presets")
    assert set(r.stdout.split()) >= {"cpu-demo", "cpu-full", "imagenet", "tiny"}


def test_presets_load_into_valid_configs():
    from simclrv2.config import load_preset, make_config, preset_names

    for name in preset_names():
        preset = load_preset(name)
        for stage in ("pretrain", "finetune", "supervised", "distill", "linear_eval"):
            make_config(stage, preset, out="x")
    imagenet = make_config("pretrain", load_preset("imagenet"), out="x")
    assert (imagenet.batch_size, imagenet.epochs, imagenet.temperature, imagenet.memory_size) == (4096, 800, 0.1, 65536)
    # a stage run alone with a preset (`simclrv2 pretrain --preset cpu-demo`) trains the preset's model
    demo = load_preset("cpu-demo")
    for stage in ("pretrain", "supervised"):
        c = make_config(stage, demo, out="x")
        assert (c.depth, c.width, c.sk) == (demo["model"]["depth"], demo["model"]["width"], demo["model"]["sk"])
    assert make_config("distill", demo, out="x").depth is None  # the student defaults to the teacher's architecture


def test_parse_overrides():
    assert parse_overrides(["pretrain.epochs=5", "seed=1", "finetune.head-layer=0"]) == {
        "pretrain": {"epochs": 5}, "seed": 1, "finetune": {"head_layer": 0}}


@pytest.mark.slow
def test_labels_per_class_overrides_the_default_fraction(tmp_path):
    from simclrv2.data import load_dataset

    out = tmp_path / "sup"
    rc, err = run("supervised", "--dataset", "digits", "--labels-per-class", "4", "--batch-size", "20", "--epochs", "1",
                  "--depth", "18", "--width", "0.0625", "--out", str(out))
    assert rc == 0, err
    ids = (out / "labeled_subset.txt").read_text().split()
    train = load_dataset("digits", "train")
    label_of = dict(zip(train.ids, train.labels))
    per_class = [sum(1 for i in ids if label_of[i] == c) for c in range(10)]
    assert per_class == [4] * 10


@pytest.mark.slow
def test_pipeline_stages_run_apart_then_report(tmp_path):
    """--stages splits the recipe over processes sharing --out; the report appears once all are done."""
    out = tmp_path / "run"
    # fine-tuning cannot start before the pretraining it starts from has finished
    with pytest.raises(ConfigError, match="run the pipeline with --stages pretrain first"):
        run_pipeline("tiny", out, stages=["finetune"])
    partial = run_pipeline("tiny", out, stages=["supervised"])
    assert [r["stage"] for r in partial["results"]] == ["supervised"]
    assert not (out / "pretrain" / "final.safetensors").exists() and not (out / "report.json").exists()
    assert str(out / "pretrain") in partial["not_finished"]
    sup_mtime = (out / "labels_0.1" / "supervised" / "final.safetensors").stat().st_mtime_ns
    partial = run_pipeline("tiny", out, stages=["pretrain", "linear_eval", "finetune"])
    assert [r["stage"] for r in partial["results"]] == ["supervised", "pretrain_linear", "finetune"]
    assert not (out / "labels_0.1" / "distill_self").exists() and not (out / "report.json").exists()
    report = run_pipeline("tiny", out, stages=["distill"])
    assert [(r["stage"], r.get("variant")) for r in report["results"]] == [
        ("supervised", None), ("pretrain_linear", None), ("finetune", "head layer 1"), ("distill", "self"),
        ("distill", "big-to-small")]
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]
    # the supervised baseline trained first was reused, not trained again
    assert (out / "labels_0.1" / "supervised" / "final.safetensors").stat().st_mtime_ns == sup_mtime
    assert main(["pipeline", "--preset", "tiny", "--out", str(out), "--stages", "pretrian"]) == 2


def test_python_api_logs_like_the_cli_unless_the_caller_configured_logging(tmp_path):
    import logging

    import simclrv2

    logger = logging.getLogger("simclrv2")
    saved = logger.level, list(logger.handlers)
    try:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
        with pytest.raises(Exception):
            simclrv2.evaluate(str(tmp_path / "missing"))
        assert logger.level == logging.INFO and logger.handlers  # INFO lines and the progress bar, as the CLI
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.setLevel(logging.WARNING)  # the caller's choice is kept
        with pytest.raises(Exception):
            simclrv2.evaluate(str(tmp_path / "missing"))
        assert logger.level == logging.WARNING and not logger.handlers
    finally:
        logger.setLevel(saved[0])
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in saved[1]:
            logger.addHandler(h)
