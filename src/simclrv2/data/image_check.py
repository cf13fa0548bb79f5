"""Checking an image folder before training: every file decoded once, results cached per file.

A DataLoader worker that meets an unreadable file hours into a run stops the run; decoding every
image up front finds such files in minutes, names them, and lets ``--skip-bad-images`` drop them.
At ImageNet scale (1.3M files, ~200 decodes/s per worker) the check itself is long, so:

* **Sharded.** Under torchrun each process checks every ``world_size``-th file (its own shard:
  stat + decode), in rounds of at most ``ROUND_PER_WORKER x workers`` images per process, with one
  small collective per round. No process waits for another longer than one round's imbalance
  (seconds), far below the process group's timeout (``--dist-timeout``).
* **Cached per file, incrementally.** Each round's results are appended to a JSON-lines cache
  file keyed by the folder, split and decode size (:func:`cache_path`): one line per file, its
  size and modification time and the reason it is unreadable ("" when readable). A relaunch, a
  later stage of the recipe, or a rerun after a crash mid-check skips every file whose size and
  modification time are unchanged; a changed file is decoded again. A truncated last line (a
  process killed mid-write) is ignored.
* **Skippable.** ``check_images: false`` (``--no-check-images``) skips it, with a warning: a
  broken file then stops training when a loader meets it. The folder is then scanned by reading
  each file's header only (:func:`scan_images` with ``decode=False``).
* **What the data is.** Each file's line also records its size in pixels, whether it is gray (one
  channel, or three equal ones), and for images of more than 8 bits their largest value.
  :func:`scan_images` sums these up per folder (:class:`FolderSummary`), from which the stages
  decide the channels, the bit depth and the default image size of an image folder
  (:mod:`simclrv2.data.folders`).

The cache lives in ``$SIMCLRV2_CACHE_DIR`` (default ``$XDG_CACHE_HOME/simclrv2`` or
``~/.cache/simclrv2``), outside the run directory: it describes the data, not a run. Only global
rank 0 writes it; the other processes read their own node's copy, so correctness never depends on
the cache being shared (a process that finds no cached entry decodes the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from simclrv2.distributed import all_gather_objects, world
from simclrv2.errors import DataError
from simclrv2.runtime import log

ROUND_PER_WORKER = 512  # images per process and decode worker between two collectives
_WORKERS_FROM = 256  # fewer images to decode are decoded in this process (no worker start-up)
_LOG_EVERY_S = 30.0


def cache_dir() -> Path:
    root = os.environ.get("SIMCLRV2_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "simclrv2"


def cache_path(root: str, split: str, image_size: int) -> Path:
    key = hashlib.sha256(f"{os.path.abspath(root)}\0{split}\0{image_size}\0v2".encode()).hexdigest()[:24]
    return cache_dir() / "image-check" / f"{key}.jsonl"


@dataclass
class FolderSummary:
    """What a scan found in a folder's readable images: all gray?, the largest value of its images of
    more than 8 bits (-1: none, or not decoded), and the count of each (height, width)."""

    gray: bool = True
    high_bit: bool = False
    max_value: int = -1
    sizes: Counter = field(default_factory=Counter)

    def add(self, info: dict) -> None:
        self.gray &= bool(info["gray"])
        if info["bits"] > 8:
            self.high_bit = True
            self.max_value = max(self.max_value, int(info["max"]))
        self.sizes[(int(info["h"]), int(info["w"]))] += 1

    def merge(self, other: FolderSummary) -> None:
        self.gray &= other.gray
        self.high_bit |= other.high_bit
        self.max_value = max(self.max_value, other.max_value)
        self.sizes.update(other.sizes)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def _read_cache(path: Path) -> dict[str, tuple[int, int, str, dict]]:
    """id -> (size, mtime_ns, reason, info) of the cached results; later lines win; bad lines ignored."""
    entries: dict[str, tuple[int, int, str, dict]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    name, size, mtime, reason, info = json.loads(line)
                    if not reason and not {"h", "w", "gray", "bits", "max"} <= set(info):
                        continue
                    entries[str(name)] = (int(size), int(mtime), str(reason), dict(info))
                except (ValueError, TypeError, AttributeError):
                    continue  # a line cut short by a killed process, or not ours
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning(f"image check: cannot read the cache {path} ({e.strerror}); checking every image")
    return entries


class _CacheWriter:
    """Appends result lines; turns itself off (one warning) when the cache cannot be written."""

    def __init__(self, path: Path):
        self.path, self.file = path, None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")
        except OSError as e:
            log.warning(f"image check: cannot write the cache {path} ({e.strerror}); results are not kept "
                        "(set SIMCLRV2_CACHE_DIR to a writable directory)")

    def write(self, rows: list[tuple[str, int, int, str, dict]]) -> None:
        if self.file is None or not rows:
            return
        self.file.write("".join(json.dumps(list(r)) + "\n" for r in rows))
        self.file.flush()  # each round's results survive a kill of this process

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Probe(torch.utils.data.Dataset):
    """Decodes image i as training will (``decode=False``: reads its header); returns
    (i, size, mtime_ns, '' or the reason, info of :func:`~simclrv2.data.sources.probe_image`)."""

    def __init__(self, ds, indices: np.ndarray, decode: bool = True):
        self.ds, self.indices, self.decode = ds, indices, decode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        from simclrv2.data.sources import probe_image

        i = int(self.indices[j])
        path = self.ds.path(i)
        st = _stat(path) or (-1, -1)
        info: dict = {}
        try:
            info = probe_image(path, self.ds.decode_side, self.decode)
            reason = ""
        except Exception as e:  # noqa: BLE001 - any failure makes the image unreadable
            text = " ".join(str(e).split()) or type(e).__name__
            reason = text if isinstance(e, DataError) else f"cannot decode image {path}: {type(e).__name__}: {text}"
        return i, st[0], st[1], reason, info


def unreadable_images(ds, workers: int) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(id, reason) of the unreadable images of image folder ``ds`` (the same list on every
    process), and this process's counts: ``{"decoded": n, "cached": n}``."""
    bad, counts, _ = scan_images(ds, workers)
    return bad, counts


def scan_images(ds, workers: int, decode: bool = True) -> tuple[list[tuple[str, str]], dict[str, int], FolderSummary]:
    """:func:`unreadable_images`, plus the :class:`FolderSummary` of the readable images (the same on
    every process). ``decode=False`` reads each file's header only (nothing cached): a file that
    cannot be opened is unreadable, one that cannot be decoded is not found."""
    rank, size = world()
    cache = cache_path(ds.root, ds.split, ds.image_size)
    known = _read_cache(cache) if decode else {}
    mine = np.arange(rank, len(ds), size)
    bad: list[tuple[int, str]] = []
    summary = FolderSummary()
    todo = []
    for i in mine:  # cached, unchanged files are not decoded again
        hit = known.get(ds.ids[i])
        if hit is not None and hit[:2] == _stat(ds.path(int(i))):
            if hit[2]:
                bad.append((int(i), hit[2]))
            else:
                summary.add(hit[3])
        else:
            todo.append(int(i))
    counts = {"decoded": len(todo), "cached": len(mine) - len(todo)}
    totals = all_gather_objects(len(todo))
    pending = sum(totals)
    per_round = ROUND_PER_WORKER * max(1, workers)
    rounds = -(-max(totals) // per_round) if pending else 0
    if pending and decode:
        log.info(f"checking {pending} of the {len(ds)} images of {ds.root} {ds.split} "
                 f"({len(ds) - pending} unchanged since an earlier check) ...")
    writer = _CacheWriter(cache) if rank == 0 and pending and decode else None
    batch = 64
    loader = None
    if todo:
        probe = _Probe(ds, np.asarray(todo, dtype=np.int64), decode)
        # its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, and the
        # model initialised after the check would then depend on whether the check ran
        loader = iter(torch.utils.data.DataLoader(probe, batch_size=batch, collate_fn=list, generator=torch.Generator(),
                                                  num_workers=workers if len(todo) >= _WORKERS_FROM else 0))
    done, t0, t_log = 0, time.perf_counter(), time.perf_counter()
    try:
        for _ in range(rounds):
            rows: list[tuple[int, int, int, str, dict]] = []
            while loader is not None and len(rows) < per_round:
                try:
                    rows.extend(next(loader))
                except StopIteration:
                    loader = None
            bad.extend((i, r) for i, _, _, r, _ in rows if r)
            for *_, r, info in rows:
                if not r:
                    summary.add(info)
            named = [(ds.ids[i], s, m, r, info) for i, s, m, r, info in rows]
            gathered = all_gather_objects(named)
            done += sum(len(g) for g in gathered)
            if writer is not None:
                for g in gathered:
                    writer.write(g)
            now = time.perf_counter()
            if now - t_log >= _LOG_EVERY_S:
                rate = done / (now - t0)
                log.info(f"checked {done}/{pending} images ({rate:.0f}/s, about {int((pending - done) / rate)} s left)")
                t_log = now
    finally:
        if writer is not None:
            writer.close()
    everyone = all_gather_objects((bad, summary))
    merged = sorted((i, r) for part, _ in everyone for i, r in part)
    total = FolderSummary()
    for _, part in everyone:
        total.merge(part)
    return [(ds.ids[i], r) for i, r in merged], counts, total
