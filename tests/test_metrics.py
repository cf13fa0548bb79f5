"""MetricsWriter (simclrv2.metrics): metrics.jsonl, metrics.csv with the same rows, TensorBoard when installed."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from simclrv2.engine import Progress
from simclrv2.metrics import MetricsWriter, read_jsonl, tensorboard_available

ROWS = [
    {"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 0.1, "images_per_s": 100.0, "contrastive": 1.5, "probe_loss": 0.5},
    {"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 0.05, "images_per_s": 110.0, "contrastive": 1.2, "probe_loss": 0.3,
     "knn": 42.0},
    {"step": 3, "epoch": 1.5, "loss": 1.25, "lr": 0.01, "images_per_s": 120.0, "contrastive": 1.0, "probe_loss": 0.25},
]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same(csv_rows, rows):
    assert len(csv_rows) == len(rows)
    for c, r in zip(csv_rows, rows):
        assert {k: float(v) for k, v in c.items() if v != ""} == {k: float(v) for k, v in r.items()}


def test_jsonl_and_csv_hold_the_same_rows_and_resume_drops_later_rows(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as m:
        for r in ROWS:
            m.write(r)
    assert read_jsonl(tmp_path / "metrics.jsonl") == ROWS
    rows = _csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "images_per_s", "contrastive", "probe_loss", "knn"]
    _same(rows, ROWS)
    assert rows[0]["knn"] == "" and rows[2]["knn"] == ""

    # resume from step 2: the row a killed run logged after its checkpoint (step 3) goes, new rows append
    with MetricsWriter(tmp_path, start_step=2, tensorboard=False) as m:
        m.write({**ROWS[2], "loss": 1.0})
    expected = ROWS[:2] + [{**ROWS[2], "loss": 1.0}]
    assert read_jsonl(tmp_path / "metrics.jsonl") == expected
    _same(_csv(tmp_path / "metrics.csv"), expected)

    # a fresh start (step 0) starts over
    with MetricsWriter(tmp_path, tensorboard=False) as m:
        m.write(ROWS[0])
    assert read_jsonl(tmp_path / "metrics.jsonl") == ROWS[:1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_disabled_writer_writes_nothing(tmp_path):
    m = MetricsWriter(tmp_path / "x", enabled=False)
    m.write(ROWS[0])
    m.close()
    assert not (tmp_path / "x").exists() and m.rows == ROWS[:1]


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard not installed (optional extra)")
def test_tensorboard_event_files_hold_loss_lr_probe_and_knn(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as m:
        for r in ROWS:
            m.write(r)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/probe_loss", "eval/knn"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/knn")] == [(2, 42.0)]


def test_plain_progress_lines_show_step_epoch_loss_speed_and_eta():
    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    logger = logging.getLogger("simclrv2")
    keep, level = Keep(), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        p = Progress(total=10, start=0, desc="pretrain", enabled=True, log_every=5)  # stderr is no terminal here
        p.update(5, {"epoch": 1.0, "loss": 2.5, "lr": 0.1, "images_per_s": 300.0})
        p.close()
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    line = keep.lines[-1]
    for part in ("pretrain step 5/10", "epoch=1", "loss=2.5", "images_per_s=300", "eta=0:00:0"):
        assert part in line, line


def test_fit_writes_csv_next_to_jsonl(tmp_path):
    from simclrv2.config import make_config
    from simclrv2.stages import supervised

    out = tmp_path / "sup"
    supervised(make_config("supervised", out=str(out), dataset="digits", depth=18, width=0.0625, epochs=2,
                           batch_size=128, precision="fp32", label_fraction=0.2, log_every=1, min_steps=0))
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows and rows[-1]["epoch"] == 2.0
    _same(_csv(out / "metrics.csv"), rows)
    assert json.loads((out / "final.json").read_text())["complete"]
