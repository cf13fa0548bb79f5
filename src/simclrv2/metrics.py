"""Where a stage's training metrics go: metrics.jsonl, metrics.csv and (optionally) TensorBoard.

:class:`MetricsWriter` takes the rows :func:`simclrv2.engine.fit` logs (``step``, ``epoch``, ``loss``,
``lr``, ``images_per_s`` and the task's parts: ``contrastive``, ``probe_loss``, at epoch ends ``knn``)
and writes each one

* to ``metrics.jsonl``: one JSON object per line, appended and flushed as it comes;
* to ``metrics.csv``: the same rows, one column per key (in the order keys first appear); a row that
  brings a new key (``knn`` at the first epoch end) rewrites the file atomically with the wider header;
* to TensorBoard event files in ``tensorboard/`` when the ``tensorboard`` package is installed
  (``pip install "simclrv2[tensorboard]"``; ``tensorboard --logdir OUT``): every numeric value
  but ``step``/``epoch`` as a scalar, tagged ``train/loss``, ``train/lr``, ``train/probe_loss``,
  ``eval/knn``, ..., at its step.

A fresh run (``start_step=0``) starts every file afresh; a resumed run keeps the rows up to its resume
step and drops the ones a killed run logged after its last checkpoint, so the files read as one
uninterrupted run.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

from simclrv2.checkpoint import atomic_write_text
from simclrv2.runtime import log

JSONL, CSV, TB_DIR = "metrics.jsonl", "metrics.csv", "tensorboard"
EVAL_KEYS = ("knn", "top1", "top5")


def tensorboard_available() -> bool:
    try:
        importlib.import_module("tensorboard")
        importlib.import_module("torch.utils.tensorboard")
    except Exception:  # noqa: BLE001 - missing package, or a broken install: TensorBoard is optional
        return False
    return True


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a line cut short by a kill is skipped)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class MetricsWriter:
    """metrics.jsonl + metrics.csv (+ TensorBoard events) of one stage directory.

    ``enabled=False`` (processes other than rank 0) writes nothing. ``tensorboard=None`` uses
    TensorBoard when it is installed; ``True`` asks for it (a warning if it is missing); ``False`` never.
    """

    def __init__(self, out_dir: str | Path, start_step: int = 0, enabled: bool = True, tensorboard: bool | None = None):
        self.out = Path(out_dir)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self._jsonl = self._csv = self._tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(self.out / JSONL) if r.get("step", 0) <= start_step] if start_step else []
        for r in kept:
            self._add_columns(r)
        self.rows = kept
        atomic_write_text(self.out / JSONL, "".join(json.dumps(r) + "\n" for r in kept))
        atomic_write_text(self.out / CSV, _csv_text(self.columns, kept) if kept else "")
        self._jsonl = (self.out / JSONL).open("a")
        self._csv = (self.out / CSV).open("a", newline="")
        if start_step == 0 and (self.out / TB_DIR).is_dir():
            shutil.rmtree(self.out / TB_DIR, ignore_errors=True)  # an older run's curves
        use_tb = tensorboard_available() if tensorboard is None else tensorboard
        if use_tb:
            if tensorboard_available():
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: events a killed run wrote after the resume point are hidden
                self._tb = SummaryWriter(str(self.out / TB_DIR), purge_step=start_step or None)
            else:
                log.warning("metrics: the tensorboard package is not installed; pip install tensorboard for event files")

    # ------------------------------------------------------------------ writing

    def _add_columns(self, row: dict[str, Any]) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns.extend(new)
        return bool(new)

    def write(self, row: dict[str, Any]) -> None:
        """Record one row (a flat dict of numbers) everywhere."""
        self.rows.append(dict(row))
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._add_columns(row) or self._csv.tell() == 0:
            self._csv.close()  # a wider header: rewrite the whole file (atomically), then append again
            atomic_write_text(self.out / CSV, _csv_text(self.columns, self.rows))
            self._csv = (self.out / CSV).open("a", newline="")
        else:
            csv.DictWriter(self._csv, fieldnames=self.columns, lineterminator="\n", restval="").writerow(row)
            self._csv.flush()
        if self._tb is not None:
            step = int(row.get("step", len(self.rows)))
            for k, v in row.items():
                if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue
                self._tb.add_scalar(f"{'eval' if k in EVAL_KEYS else 'train'}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._csv):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl = self._csv = self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MetricsWriter", "read_jsonl", "tensorboard_available"]
