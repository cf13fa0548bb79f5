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

The contract: the metadata is a :class:`CheckpointMeta` (versioned, :data:`FORMAT_VERSION`; its
model a :class:`simclrv2.models.ModelSpec`), tensors are ``model.*`` (the model's state dict),
and in a resume point ``last.*`` also ``optim.*`` (momentum buffers) and ``extra.*`` (the task's
own state, e.g. the memory queue). Every checkpoint is written by :func:`save_checkpoint` and read
by :func:`load_checkpoint` / :func:`read_meta`; :func:`load_model` rebuilds its model. Format 1
(simclrv2 0.1.0 up to commit b64d9db) still loads; a format newer than this code is an error
saying to upgrade.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from simclrv2.errors import CheckpointError, UserError
from simclrv2.models.spec import ModelSpec

FORMAT_VERSION = 2  # 2: typed ModelSpec (SK, stem type and avg_down apart; image_size in the spec); 1: b64d9db and before
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


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """``with atomic_path(path) as tmp:`` write the file at ``tmp`` (a hidden temporary file beside
    ``path``); on leaving the block it is fsynced and renamed onto ``path`` (then the directory
    fsynced), or removed if the block failed. An OSError (disk full, ...) names ``path``, not the
    temporary file. Every file of ours is written through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:  # name the file the user knows, not the hidden temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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


@dataclass
class CheckpointMeta:
    """A checkpoint's metadata: what its model is (``model``) and how it was made."""

    stage: str  # pretrain | supervised | finetune | linear_eval | distill | import-tf
    model: ModelSpec
    classes: list[str] | None = None  # class names in label order
    dataset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the stage's options (its RunConfig, as in OUT/config.yaml)
    step: int = 0  # training steps done
    total_steps: int = 0
    steps_per_epoch: int = 0
    epoch: float = 0.0
    complete: bool = False  # final.*: training finished
    metrics: dict[str, Any] = field(default_factory=dict)  # the last logged row of metrics.jsonl
    precision: str | None = None  # the autocast precision it trained in
    train_seconds: float = 0.0  # all runs of the stage together (a resumed run adds its time)
    grad_scaler: dict[str, Any] | None = None  # fp16: torch.amp.GradScaler's state (exact resume)
    result: dict[str, Any] | None = None  # the stage's result, stored in final.* once it is evaluated
    pretrained: str | None = None  # finetune / linear_eval: the checkpoint it started from
    teacher: str | None = None  # distill
    temperature: float | None = None  # distill
    self_distillation: bool | None = None  # distill
    imported: dict[str, Any] | None = None  # import-tf: the TF checkpoint it came from and how it was read
    bit_depth: int | None = None  # image folders: the bits images of more than 8 bits were scaled by (data/folders.py)
    format_version: int = FORMAT_VERSION

    @property
    def image_size(self) -> int | None:
        return self.model.image_size

    def replace(self, **changes: Any) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.to_json()
        out["format_version"] = FORMAT_VERSION
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "checkpoint") -> CheckpointMeta:
        """The metadata of a checkpoint's JSON, of any format up to :data:`FORMAT_VERSION`; a
        one-line CheckpointError naming ``source`` for anything else."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: corrupted checkpoint metadata (expected a JSON object)")
        version = data.get("format_version")
        if type(version) is not int or version < 1:
            raise CheckpointError(f"{source}: checkpoint metadata without a valid format_version ({version!r}); "
                                  "expected a checkpoint written by simclrv2")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{source}: checkpoint format {version} was written by a newer simclrv2 (this one reads "
                                  f"formats 1 to {FORMAT_VERSION}); upgrade simclrv2 (pip install -U simclrv2) to load it")
        data = {k: v for k, v in data.items() if v is not None}  # None: the field's default
        if "model" not in data:
            raise CheckpointError(f"{source}: checkpoint JSON has no model spec")
        if version == 1:
            data = _from_format_1(data)
        if not isinstance(data.get("stage"), str):
            raise CheckpointError(f"{source}: checkpoint JSON names no stage")
        try:
            spec = ModelSpec.from_json(data.pop("model"), version=version)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid model spec in the checkpoint ({' '.join(str(e).split())[:200]})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"{source}: unknown checkpoint metadata {unknown[0][:40]!r} in format {version}; "
                                  "expected a checkpoint written by simclrv2")
        for name, check in _META_TYPES.items():
            if name in data and not check(data[name]):
                what = "a list of names" if name == "classes" else "another type"
                raise CheckpointError(f"{source}: invalid {name.replace('_', ' ')} in the checkpoint (expected {what})")
        return cls(model=spec, **data)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


_META_TYPES = {
    "stage": lambda v: isinstance(v, str), "classes": lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
    "dataset": lambda v: isinstance(v, str), "config": lambda v: isinstance(v, dict), "step": _is_int,
    "total_steps": _is_int, "steps_per_epoch": _is_int, "epoch": _is_number, "complete": lambda v: isinstance(v, bool),
    "metrics": lambda v: isinstance(v, dict), "precision": lambda v: isinstance(v, str), "train_seconds": _is_number,
    "grad_scaler": lambda v: isinstance(v, dict), "result": lambda v: isinstance(v, dict),
    "pretrained": lambda v: isinstance(v, str), "teacher": lambda v: isinstance(v, str), "temperature": _is_number,
    "self_distillation": lambda v: isinstance(v, bool), "imported": lambda v: isinstance(v, dict),
    "bit_depth": _is_int,
}


def _from_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1's keys as format 2's: the image size moves into the model spec (whose ``sk`` and
    ``small_images`` :meth:`ModelSpec.from_json` translates); import-tf's model summary
    (``config``, ``kind``: the spec said the same) goes and its ``metadata`` becomes ``imported``;
    keys format 2 does not have are dropped (format 1 was a free dict)."""
    model = dict(data["model"]) if isinstance(data["model"], dict) else data["model"]
    if isinstance(model, dict):
        model.setdefault("image_size", data.get("image_size"))
    out = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(CheckpointMeta)}}
    out["model"] = model
    if data.get("stage") == "import-tf":
        out.pop("config", None)
        out["imported"] = data.get("metadata")
    return out


def save_checkpoint(path_stem: str | Path, tensors: dict[str, torch.Tensor], meta: CheckpointMeta) -> None:
    """Write ``path_stem.safetensors`` and ``path_stem.json`` atomically (the .safetensors first):
    the one writer of every checkpoint."""
    stem = Path(path_stem)
    text = json.dumps(meta.to_json(), indent=2, sort_keys=True, default=_json_default, allow_nan=True)
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
    """The JSON object of the header's metadata (format not yet interpreted)."""
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


def read_meta(path: str | Path) -> CheckpointMeta:
    """A checkpoint's metadata, from the safetensors header (the .json beside it may lag)."""
    p = resolve(path)
    return CheckpointMeta.from_json(_parse_meta(p, _read_header(p)), p)


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


def load_checkpoint(path: str | Path, allow_unverified: bool | None = None) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """(tensors, metadata) of a checkpoint; a clear CheckpointError for anything unreadable: the one loader.

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
    return tensors, CheckpointMeta.from_json(meta, p)


def load_model(path: str | Path, kind: str | None = None) -> tuple[nn.Module, CheckpointMeta]:
    """A checkpoint's model (built from its spec, weights loaded) and its metadata; ``kind``
    ('simclr' / 'classifier') is checked if given."""
    from simclrv2.models import build_model

    tensors, meta = load_checkpoint(path)
    source = resolve(path)
    spec = meta.model
    if kind is not None and spec.kind != kind:
        expected = {"simclr": "a pretrained (pretrain/import-tf) checkpoint",
                    "classifier": "a classifier (finetune/distill/supervised) checkpoint"}[kind]
        raise CheckpointError(f"{source}: is a {spec.kind!r} checkpoint of stage {meta.stage!r}; expected {expected}")
    try:
        model = build_model(spec)
    except (UserError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: invalid model spec in the checkpoint ({' '.join(str(e).split())[:200]})") from None
    load_state(model, subdict(tensors, "model."), source, f"{spec.kind} model (depth {spec.depth}, width {spec.width})")
    if spec.kind == "classifier" and meta.classes and len(meta.classes) != spec.num_classes:
        raise CheckpointError(f"{source}: the checkpoint names {len(meta.classes)} classes for its {spec.num_classes}-class "
                              "classifier; its class list and its model do not belong together")
    return model, meta


def load_encoder(path: str | Path) -> nn.Module:
    """The ResNet encoder of any checkpoint (pretrained, fine-tuned, distilled, imported) as a plain
    ``nn.Module``: images [B, C, H, W] in [0, 1] -> features [B, D], in eval mode.

    Its weights sit in the safetensors file under ``model.encoder.`` with torchvision's ResNet names
    (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer1.0.downsample.0`` / ``.1``); for the
    ImageNet stem without selective kernels or average-pool shortcuts the tensors load as they are
    into ``torchvision.models.resnet18/50(...)`` built without ``fc``. One computation differs: the
    stem's max-pool is TF's 'SAME' (the official checkpoints'), which for an even input to it
    (224 px images -> 112) pads only the bottom/right: ``nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
    nn.MaxPool2d(3, 2))`` in place of torchvision's ``maxpool`` gives the same features
    (tests/test_load_encoder.py)."""
    model, _ = load_model(path)
    return model.encoder.eval()


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def subdict(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """How ``state`` fails to fit a module whose state dict is ``own`` (names and shapes), or None."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    detail = []
    if wrong:
        k = wrong[0]
        detail.append(f"{k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
    if missing:
        detail.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    return "; ".join(detail) or None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error naming the file."""
    mismatch = state_mismatch(module.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{source}: does not match the expected {what}: {mismatch}")
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
        return read_meta(path).step
    except CheckpointError:
        return None
