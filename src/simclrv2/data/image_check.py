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
  broken file then stops training when a loader meets it.

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
    key = hashlib.sha256(f"{os.path.abspath(root)}\0{split}\0{image_size}".encode()).hexdigest()[:24]
    return cache_dir() / "image-check" / f"{key}.jsonl"


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def _read_cache(path: Path) -> dict[str, tuple[int, int, str]]:
    """id -> (size, mtime_ns, reason) of the cached results; later lines win; bad lines ignored."""
    entries: dict[str, tuple[int, int, str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    name, size, mtime, reason = json.loads(line)
                    entries[str(name)] = (int(size), int(mtime), str(reason))
                except (ValueError, TypeError):
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

    def write(self, rows: list[tuple[str, int, int, str]]) -> None:
        if self.file is None or not rows:
            return
        self.file.write("".join(json.dumps(list(r)) + "\n" for r in rows))
        self.file.flush()  # each round's results survive a kill of this process

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Probe(torch.utils.data.Dataset):
    """Decodes image i exactly as training will; returns (i, size, mtime_ns, '' or the reason)."""

    def __init__(self, ds, indices: np.ndarray):
        self.ds, self.indices = ds, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        from simclrv2.data.sources import decode_image

        i = int(self.indices[j])
        path = self.ds.path(i)
        st = _stat(path) or (-1, -1)
        try:
            decode_image(path, self.ds.image_size)
            reason = ""
        except Exception as e:  # noqa: BLE001 - any failure makes the image unreadable
            text = " ".join(str(e).split()) or type(e).__name__
            reason = text if isinstance(e, DataError) else f"cannot decode image {path}: {type(e).__name__}: {text}"
        return i, st[0], st[1], reason


def unreadable_images(ds, workers: int) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(id, reason) of the unreadable images of image folder ``ds`` (the same list on every
    process), and this process's counts: ``{"decoded": n, "cached": n}``."""
    rank, size = world()
    cache = cache_path(ds.root, ds.split, ds.image_size)
    known = _read_cache(cache)
    mine = np.arange(rank, len(ds), size)
    bad: list[tuple[int, str]] = []
    todo = []
    for i in mine:  # cached, unchanged files are not decoded again
        hit = known.get(ds.ids[i])
        if hit is not None and hit[:2] == _stat(ds.path(int(i))):
            if hit[2]:
                bad.append((int(i), hit[2]))
        else:
            todo.append(int(i))
    counts = {"decoded": len(todo), "cached": len(mine) - len(todo)}
    totals = all_gather_objects(len(todo))
    pending = sum(totals)
    per_round = ROUND_PER_WORKER * max(1, workers)
    rounds = -(-max(totals) // per_round) if pending else 0
    if pending:
        log.info(f"checking {pending} of the {len(ds)} images of {ds.root} {ds.split} "
                 f"({len(ds) - pending} unchanged since an earlier check) ...")
    writer = _CacheWriter(cache) if rank == 0 and pending else None
    batch = 64
    loader = None
    if todo:
        probe = _Probe(ds, np.asarray(todo, dtype=np.int64))
        # its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, and the
        # model initialised after the check would then depend on whether the check ran
        loader = iter(torch.utils.data.DataLoader(probe, batch_size=batch, collate_fn=list, generator=torch.Generator(),
                                                  num_workers=workers if len(todo) >= _WORKERS_FROM else 0))
    done, t0, t_log = 0, time.perf_counter(), time.perf_counter()
    try:
        for _ in range(rounds):
            rows: list[tuple[int, int, int, str]] = []
            while loader is not None and len(rows) < per_round:
                try:
                    rows.extend(next(loader))
                except StopIteration:
                    loader = None
            bad.extend((i, r) for i, _, _, r in rows if r)
            named = [(ds.ids[i], s, m, r) for i, s, m, r in rows]
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
    everyone = all_gather_objects(bad)
    merged = sorted((i, r) for part in everyone for i, r in part)
    return [(ds.ids[i], r) for i, r in merged], counts
