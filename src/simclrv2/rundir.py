"""A stage's output directory (``--out``): what a run finds there, who may write it, and what a
failed start leaves behind.

Every training stage runs inside a :class:`StageRun`, which, before any work:

1. takes the directory's lock (:class:`RunLock`, ``OUT/.lock``), held until the stage returns or
   fails: a second process writing the same ``--out`` stops at once, naming the holder;
2. decides from the checkpoints in OUT (:func:`decide`) what this command does:

   * nothing there: train from the start;
   * a finished run of this stage with an equal config (:func:`config_difference`: every option
     that changes results): reuse its result;
   * an interrupted run (``last.*``, or ``final.*`` without a result) of this stage with an equal
     config: continue it from its checkpoint (``--resume`` also continues one whose options differ);
   * anything else (another stage, other options): a one-line error naming the difference;
   * ``--restart``: train from the start, replacing whatever is there once training begins.

   Under torchrun rank 0 decides (and alone holds the lock) and every rank gets its decision.
3. remembers what OUT looked like: if the command fails before training begins
   (:meth:`StageRun.begin`), it leaves the file system as it found it (files it created removed,
   files it changed restored, directories it created removed).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from simclrv2 import checkpoint as ckpt
from simclrv2.config import RunConfig
from simclrv2.errors import CheckpointError, ConfigError, UserError
from simclrv2.runtime import Runtime, init_runtime, log

LOCK_FILE = ".lock"
# options that do not change what a run computes: a run is continued or reused whatever their values
IGNORED_OPTIONS = frozenset({"out", "device", "workers", "log_every", "checkpoint_every", "eval_batch_size", "resume",
                             "restart", "allow_unverified", "compile", "channels_last", "check_images", "dist_timeout",
                             "activation_checkpointing", "image_cache_gb"})
PATH_OPTIONS = frozenset({"data_dir", "unlabeled_dir", "labeled_dir", "test_dir", "subset_file", "pretrained", "teacher",
                          "init_from"})
# what a stage writes in OUT (a failed start removes the ones it created)
RUN_FILES = ("config.yaml", "labeled_subset.txt", "validation_split.txt", "metrics.jsonl", "metrics.csv", "tensorboard",
             "last.safetensors", "last.json", "final.safetensors", "final.json")
_RESTORED = ("config.yaml", "labeled_subset.txt", "validation_split.txt")  # small files a start may rewrite


# ------------------------------------------------------------------ the lock

class RunLock:
    """An exclusive ``fcntl.flock`` on ``DIR/.lock`` that holds the pid, host and start time of its
    holder. The kernel releases it when the holder exits however it exits (SIGKILL too); a lock
    file left by a dead holder is taken over with a message naming it. :meth:`release` removes the
    file (safe: :meth:`acquire` checks that the file it locked is still the one at the path)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None

    def holder(self) -> dict[str, Any]:
        try:
            info = json.loads(self.path.read_text())
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def describe(info: dict[str, Any]) -> str:
        if not info:
            return "a process that did not say which"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if isinstance(info.get("since"), (int, float)) else "?"
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since}"

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # a holder releasing at this instant removes the file: lock the new one
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OSError(e.errno, f"cannot create files in --out ({e.strerror})", str(self.dir)) from None
            stale = self.holder()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"--out {self.dir} is in use by another simclrv2 run ({self.describe(self.holder())}); "
                                      "wait for it to end, or use another --out") from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    log.warning(f"{self.path}: this file system does not support locks ({e.strerror}); nothing stops "
                                "a second process from writing this --out at the same time")
                    return
                raise OSError(e.errno, f"cannot lock ({e.strerror})", str(self.path)) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            if stale.get("pid") and (stale.get("pid"), stale.get("host")) != (me["pid"], me["host"]):
                other_host = stale.get("host") != me["host"]
                log.warning(f"{self.path}: taking over the lock of {self.describe(stale)}"
                            + (", which this host cannot see: if that run is still going, this file system does not "
                               "share locks between hosts (see README, Runs and safety)" if other_host
                               else ", which is no longer running"))
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(me) + "\n").encode())
            return
        raise ConfigError(f"--out {self.dir}: could not take {self.path} (it keeps being replaced)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------ deciding

def _normalised(name: str, value: Any) -> Any:
    if name in PATH_OPTIONS and isinstance(value, str) and value:
        return os.path.abspath(os.path.expanduser(value))
    return value  # numbers compare across int / float (1 == 1.0), exactly


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "unset"
    return str(value)


def config_difference(saved: dict[str, Any], cfg: RunConfig) -> tuple[str, Any, Any] | None:
    """(option, saved value, this config's value) of the first option that differs between a run's
    saved config and ``cfg``, among those that change results; None if they agree. Options a run
    of an older version did not record are not compared."""
    for f in fields(cfg):
        if f.name in IGNORED_OPTIONS or f.name not in saved:
            continue
        old, new = saved[f.name], getattr(cfg, f.name)
        if _normalised(f.name, old) != _normalised(f.name, new):
            return f.name, old, new
    return None


@dataclass
class Decision:
    action: str  # "fresh" | "continue" | "reuse"
    result: dict[str, Any] | None = None  # reuse: the finished run's result
    source: str | None = None  # continue: the checkpoint it continues from


def _stage_name(stage: Any) -> str:
    return str(stage).replace("_", "-") if stage else "unknown"


def decide(out: Path, stage: str, cfg: RunConfig) -> Decision:
    """What this command does with ``out`` (see the module docstring); a ConfigError when it holds
    a run this command must not continue or reuse."""
    if cfg.restart:
        return Decision("fresh")
    final, last = out / "final.safetensors", out / "last.safetensors"
    hint = "; --restart replaces it"
    try:
        meta = ckpt.read_meta(final) if final.exists() else None
        finished = bool(meta and meta.complete and meta.result is not None)
        source = final if finished else last if last.exists() else final if meta is not None else None
        if source is last:
            meta = ckpt.read_meta(last)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{hint}") from None
    if source is None:
        return Decision("fresh")
    what = "a finished" if finished else f"an interrupted (step {meta.step} of {meta.total_steps})"
    held = f"--out {out} holds {what} {_stage_name(meta.stage)} run"
    if meta.stage != stage:
        raise ConfigError(f"{held}, not a {_stage_name(stage)} run: use another --out, or --restart to replace it")
    diff = config_difference(meta.config, cfg)
    if diff is not None:
        name, old, new = diff
        flag = "--" + name.replace("_", "-")
        differs = f"{held} with {flag} {show(old)}; this command has {flag} {show(new)}"
        if finished:
            raise ConfigError(f"{differs}: use another --out, or --restart to replace it")
        if not cfg.resume:
            raise ConfigError(f"{differs}: --resume continues it with this command's options, --restart starts over, "
                              "or use another --out")
        log.warning(f"{stage}: continuing {source} with other options than it was started with ({flag} {show(old)} -> {show(new)})")
    if finished:
        return Decision("reuse", result=meta.result)
    return Decision("continue", source=str(source))


# ------------------------------------------------------------------ one stage's run

class StageRun:
    """``with StageRun(stage, cfg, rt) as run:`` lock, decision (``run.decision``), clean-up of a
    failed start; ``run.rt`` is the runtime (started here when not given)."""

    def __init__(self, stage: str, cfg: RunConfig, rt: Runtime | None = None):
        self.stage, self.cfg = stage, cfg
        self.out = Path(cfg.out)
        self.rt = rt
        self.lock = RunLock(self.out)
        self.decision = Decision("fresh")
        self.started = False
        self._created_dirs: list[Path] = []
        self._before: dict[str, bytes | None] = {}
        self._existed: set[str] = set()
        self._unverified = None
        self._owner = False  # this process holds OUT (the lock, or no lock support): it may undo a failed start

    # -------------------------------------------------------------- decision
    @property
    def reused(self) -> bool:
        return self.decision.action == "reuse"

    @property
    def continues(self) -> bool:
        return self.decision.action == "continue"

    def __enter__(self) -> StageRun:
        if self.cfg.resume and self.cfg.restart:
            raise ConfigError("--resume and --restart contradict each other: --resume continues the run in --out, "
                              "--restart throws it away")
        self.rt = self.rt or init_runtime(self.cfg.device, self.cfg.precision, self.cfg.tf32, self.cfg.dist_timeout)
        self._unverified = ckpt.unverified_allowed(self.cfg.allow_unverified)
        self._unverified.__enter__()
        outcome: tuple[str, Any] = ("ok", None)
        if self.rt.is_main:
            try:
                self._remember()
                self.lock.acquire()
                self._owner = True
                outcome = ("ok", decide(self.out, self.stage, self.cfg))
            except (UserError, OSError) as e:
                outcome = ("error", e)
        if self.rt.distributed:
            from simclrv2.distributed import broadcast_object

            outcome = broadcast_object(outcome)
        if outcome[0] == "error":
            self._close(failed=True)
            raise outcome[1]
        self.decision = outcome[1]
        if self.reused:
            log.info(f"{self.stage}: {self.out} already holds this finished run (same options); reusing its result "
                     "(--restart trains it again)")
        return self

    def begin(self) -> None:
        """Training begins (called by :func:`simclrv2.engine.fit`): from here on a failure keeps what is in OUT."""
        self.started = True

    def __exit__(self, kind, exc, tb) -> None:
        self._close(failed=kind is not None)

    # -------------------------------------------------------------- the file system as it was
    def _remember(self) -> None:
        missing, p = [], self.out.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self._created_dirs = missing  # deepest first
        if self.out.is_dir():
            self._existed = {name for name in RUN_FILES if (self.out / name).exists()}
            for name in _RESTORED:
                f = self.out / name
                try:
                    self._before[name] = f.read_bytes() if f.is_file() else None
                except OSError:
                    self._existed.discard(name)  # unreadable: leave it alone

    def _restore(self) -> None:
        for name in RUN_FILES:
            p = self.out / name
            if name in self._before:
                old = self._before[name]
                if old is None and p.exists():
                    p.unlink(missing_ok=True)
                elif old is not None and (not p.is_file() or p.read_bytes() != old):
                    ckpt.atomic_write_bytes(p, old)
            elif name not in self._existed and p.exists():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        ckpt.remove_stale_temporaries(self.out)

    def _close(self, failed: bool) -> None:
        try:
            if failed and not self.started and self.rt is not None and self.rt.is_main:
                if self._owner:
                    try:
                        self._restore()
                    except OSError as e:
                        log.warning(f"{self.out}: could not undo this failed start ({e})")
                    self.lock.release()
                for d in self._created_dirs:  # deepest first; only empty ones, up to the first that is not
                    try:
                        d.rmdir()
                    except OSError:
                        break
        finally:
            self.lock.release()
            if self._unverified is not None:
                self._unverified.__exit__(None, None, None)
                self._unverified = None


__all__ = ["Decision", "IGNORED_OPTIONS", "RunLock", "StageRun", "config_difference", "decide"]
