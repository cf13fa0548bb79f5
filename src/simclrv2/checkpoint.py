"""Checkpoints: safetensors tensors + JSON metadata. Loading never executes code.

A checkpoint is ``NAME.safetensors`` (all tensors, with the JSON metadata also embedded in the
safetensors header) and ``NAME.json`` (the same metadata, for people and tools). The safetensors
file is the source of truth, so the pair can never disagree about which weights a step refers to.
Every write is atomic: temporary file in the same directory, fsync, rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from simclrv2.errors import CheckpointError

FORMAT_VERSION = 1


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path_stem: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``path_stem.safetensors`` and ``path_stem.json`` atomically."""
    stem = Path(path_stem)
    meta = {"format_version": FORMAT_VERSION, **meta}
    text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(tensors, metadata={"simclrv2": text})
    atomic_write_bytes(stem.with_suffix(".safetensors"), data)
    atomic_write_text(stem.with_suffix(".json"), text + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def resolve(path: str | Path) -> Path:
    """Accept a stage directory (its final, else last checkpoint), a stem, or a .safetensors/.json path."""
    p = Path(path)
    if p.is_dir():
        for name in ("final", "last"):
            if (p / f"{name}.safetensors").exists():
                return p / f"{name}.safetensors"
        raise CheckpointError(f"{p}: no final.safetensors or last.safetensors in this directory")
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint file not found")
    return p


def read_meta(path: str | Path) -> dict[str, Any]:
    p = resolve(path)
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors checkpoint ({_short(e)})") from None
    if "simclrv2" not in meta:
        raise CheckpointError(f"{p}: safetensors file without simclrv2 metadata; expected a checkpoint written by simclrv2")
    try:
        return json.loads(meta["simclrv2"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{p}: corrupted checkpoint metadata (invalid JSON)") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint; a clear CheckpointError for anything unreadable."""
    p = resolve(path)
    meta = read_meta(p)
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p}: truncated or corrupted checkpoint ({_short(e)})") from None
    return tensors, meta


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def subdict(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error naming the file."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
        if missing:
            detail.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source}: does not match the expected {what}: " + "; ".join(detail))
    module.load_state_dict(state, strict=True)
