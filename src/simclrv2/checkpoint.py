"""Checkpoints: safetensors tensors + JSON metadata. Loading never executes code.

A checkpoint is ``NAME.safetensors`` (all tensors, with the JSON metadata also embedded in the
safetensors header) and ``NAME.json`` (the same metadata, for people and tools). The safetensors
file is the source of truth, so the pair can never disagree about which weights a step refers to
(the .json is written second and may lag behind after a crash; nothing reads it back).
Every write is atomic: temporary file in the same directory, fsync, rename, fsync of the
directory; a process killed at any instant leaves the previous file intact (and at worst a
hidden ``.NAME.*.tmp`` file, removed by :func:`remove_stale_temporaries` on the next start).

The header also holds a SHA-256 of the metadata and every tensor (name, dtype, shape, bytes), so a
truncated file, a flipped byte or a file that is not a checkpoint is a one-line
:class:`CheckpointError` naming the file, never wrong weights or a traceback. The header is
checked in Python before safetensors sees the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from simclrv2.errors import CheckpointError

FORMAT_VERSION = 1
META_KEY = "simclrv2"
DIGEST_KEY = "simclrv2.sha256"
TMP_SUFFIX = ".tmp"
_MAX_HEADER = 100 * 2**20
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; an OSError (disk full, ...) names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:  # name the file the user knows, not the hidden temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
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


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the hidden ``.NAME.*.tmp`` files an atomic write leaves behind when its process is
    killed between creating and renaming them. Call only where no other writer is active."""
    removed = []
    d = Path(directory)
    if d.is_dir():
        for p in d.glob(f".*{TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def content_digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata text and every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    h.update(text.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(path_stem: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``path_stem.safetensors`` and ``path_stem.json`` atomically (the .safetensors first)."""
    stem = Path(path_stem)
    meta = {"format_version": FORMAT_VERSION, **meta}
    text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(tensors, metadata={META_KEY: text, DIGEST_KEY: content_digest(text, tensors)})
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


def _read_header(p: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, after checking the whole layout: header length,
    JSON, every tensor's dtype / shape / byte range, and that the ranges tile the data exactly
    (so a truncated or padded file is caught here, with the file named)."""
    bad = f"{p}: not a valid safetensors checkpoint"
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            if size < 8:
                raise CheckpointError(f"{bad} (truncated: {size} bytes)")
            n = int.from_bytes(f.read(8), "little")
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{bad} (header length {n} does not fit the {size}-byte file; truncated or not a checkpoint)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint ({e.strerror or _short(e)})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{bad} (corrupted header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (corrupted header)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{bad} (corrupted header metadata)")
    ranges = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (dtype in _DTYPE_SIZES and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                  and type(begin) is int and type(end) is int and 0 <= begin <= end)
            numel = 1
            for d in shape:
                numel *= d
            ok = ok and end - begin == numel * _DTYPE_SIZES[dtype]
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{bad} (corrupted entry for tensor {str(name)[:80]!r})")
        ranges.append((begin, end))
    data = size - 8 - n
    pos = 0
    for begin, end in sorted(ranges):
        if begin != pos:
            raise CheckpointError(f"{bad} (corrupted tensor layout)")
        pos = end
    if pos != data:
        what = "truncated" if pos > data else "unexpected trailing bytes"
        raise CheckpointError(f"{bad} ({what}: the header describes {pos} bytes of tensor data, the file holds {data})")
    return meta


def _parse_meta(p: Path, meta: dict[str, str]) -> dict[str, Any]:
    if META_KEY not in meta:
        raise CheckpointError(f"{p}: safetensors file without simclrv2 metadata; expected a checkpoint written by simclrv2")
    if set(meta) - {META_KEY, DIGEST_KEY}:  # e.g. a damaged checksum key
        raise CheckpointError(f"{p}: corrupted checkpoint metadata (unexpected key {sorted(set(meta) - {META_KEY, DIGEST_KEY})[0][:40]!r})")
    try:
        out = json.loads(meta[META_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{p}: corrupted checkpoint metadata (invalid JSON)") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{p}: corrupted checkpoint metadata (expected a JSON object)")
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata, from the safetensors header (the .json beside it may lag)."""
    p = resolve(path)
    return _parse_meta(p, _read_header(p))


_allow_unverified = False


@contextlib.contextmanager
def unverified_allowed(allow: bool = True):
    """Within this block :func:`load_checkpoint` loads checkpoints without a checksum (with a
    warning naming the file) instead of refusing them (``--allow-unverified``)."""
    global _allow_unverified
    saved = _allow_unverified
    _allow_unverified = bool(allow) or saved
    try:
        yield
    finally:
        _allow_unverified = saved


def load_checkpoint(path: str | Path, allow_unverified: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint; a clear CheckpointError for anything unreadable.

    A checkpoint without a checksum (removed, or written by another tool) is refused unless
    ``allow_unverified`` (default: inside :func:`unverified_allowed`), then loaded with a warning.
    Never executes code from the file (safetensors + JSON only)."""
    p = resolve(path)
    raw_meta = _read_header(p)
    meta = _parse_meta(p, raw_meta)
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p}: truncated or corrupted checkpoint ({_short(e)})") from None
    except BaseException as e:  # safetensors' Rust panics derive from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise CheckpointError(f"{p}: truncated or corrupted checkpoint ({_short(e)})") from None
    digest = raw_meta.get(DIGEST_KEY)
    if digest is None:
        if not (_allow_unverified if allow_unverified is None else allow_unverified):
            raise CheckpointError(f"{p}: the checkpoint has no checksum, so its contents cannot be verified (removed, or "
                                  "written by another tool); pass --allow-unverified to load it anyway")
        logging.getLogger("simclrv2").warning(f"{p}: loading an unverified checkpoint (it has no checksum)")
    elif digest != content_digest(raw_meta[META_KEY], tensors):
        raise CheckpointError(f"{p}: corrupted checkpoint (its contents do not match the checksum in its header)")
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


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None
    (one device synchronisation for the whole dict)."""
    names = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(tensors[k]).all().to("cpu", non_blocking=False) for k in names])
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0])]


def step_of(path: str | Path) -> int | None:
    """The training step a checkpoint holds (from its header), or None if it cannot be read."""
    try:
        return int(read_meta(path).get("step"))
    except (CheckpointError, TypeError, ValueError):
        return None
