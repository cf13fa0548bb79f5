"""Import the official SimCLRv2 TensorFlow checkpoints (google-research/simclr) into our models.

Three parts, none of which needs TensorFlow:

1. :class:`TFCheckpoint`, a pure-Python (numpy) reader of TF's checkpoint format ("tensor bundle"):
   ``PREFIX.index`` is a LevelDB-format SSTable mapping variable names to ``BundleEntryProto``
   records (dtype, shape, shard, offset, size, masked CRC32C), ``PREFIX.data-0000i-of-0000N`` hold
   the raw little-endian tensor bytes. Every block checksum and every tensor checksum read is verified.
2. :func:`convert`, which maps the official variable names onto our ``SimCLRModel`` / ``Classifier``
   state dicts, inferring the architecture (depth, width, SK, head depth, classes) from the names and
   shapes. Two naming layouts are understood:

   * **TF1** (``run.py``/``resnet.py``/``model_util.py`` at the repository root; the released
     ``gs://simclr-checkpoints/simclrv2/{pretrained,finetuned_*pct,supervised,...}/rXX_Yx_skZ/model.ckpt-N``
     checkpoints, the ones converted by Separius/SimCLRv2-Pytorch ``convert.py``): encoder variables are
     named by creation order inside the ``base_model`` scope, ``base_model/conv2d[_N]/kernel`` and
     ``base_model/batch_normalization[_N]/{gamma,beta,moving_mean,moving_variance}``; the projection head is
     ``head_contrastive/nl_J/dense/kernel`` + ``head_contrastive/nl_J/batch_normalization/*`` (the last
     layer's BN has no ``beta``); the classifier is ``head_supervised/linear_layer/dense/{kernel,bias}``.
     EMA copies live under ``ema_model/``; optimizer slots end in ``/Momentum`` (LARS and momentum).
   * **TF2** object-based checkpoints written by ``tf2/run.py`` (``tf.train.Checkpoint(model=...)``) and
     SavedModel ``variables/variables``: keys are attribute paths ending in ``/.ATTRIBUTES/VARIABLE_VALUE``,
     ``.../resnet_model/initial_conv_relu_max_pool/I/{conv2d/kernel,bn/*}``,
     ``.../resnet_model/block_groups/G/layers/B/{projection_layers,conv_relu_dropblock_layers}/I/...``
     (SK: ``conv2d_fixed_padding/conv2d``, ``batch_norm_relu/bn``, ``conv2d_0``, ``batch_norm_relu_1/bn``,
     ``conv2d_1``), ``.../_projection_head/linear_layers/J/{dense/kernel,bn_relu/bn/*}`` and
     ``.../supervised_head/linear_layer/dense/{kernel,bias}`` (from the attribute names in tf2/resnet.py
     and tf2/model.py).

   Layouts: conv kernels HWIO -> OIHW, dense kernels [in, out] -> [out, in]; BN gamma/beta/moving_mean/
   moving_variance -> weight/bias/running_mean/running_var. Optimizer slots, ``global_step``,
   ``save_counter`` and the object graph are ignored.
3. :func:`import_tf`, which writes our checkpoint pair ``OUT/final.safetensors`` + ``OUT/final.json``.

Kinds and the fine-tuning layer. A checkpoint with a projection head and no hint in its path becomes a
``"simclr"`` model (encoder + full head; the linear-eval head of a pretrained checkpoint, trained on the
encoder output, becomes the online probe when our SimCLRModel has one). Paths of the official release
name their kind: ``pretrained`` -> simclr; ``finetuned_1pct``/``finetuned_10pct`` -> classifier from head
layer 1 (the official ``--ft_proj_selector=1``); ``finetuned_100pct``, ``supervised``, ``distill_*`` ->
classifier from layer 0 (the paper fine-tunes from the head's input with 100% labels; students have no
head). TF checkpoints do not record ``ft_proj_selector``: pass ``head_layer`` to override. A classifier
keeps the head truncated to ``head_layer`` (exactly what its logits use); the JSON records the full head
depth (``head_layers``) and ``head_layer``; the dropped head layers are listed in the metadata, and
importing the same checkpoint with ``kind="simclr"`` keeps the full head.

Numerics. The weights map one to one and models/resnet.py pads as TF does (the stem's 3x3/2 'SAME'
max-pool, the ResNet-D shortcut pools of SK models, fixed-padding convs; see its docstring), so an
imported model computes the TF network's function. Images are in [0, 1], as in TF.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclrv2.errors import CheckpointError, ConfigError, UserError
from simclrv2.models.head import Classifier, ProjectionHead, SimCLRModel
from simclrv2.models.resnet import STAGES, SelectiveKernel, build_resnet, scaled, sk_options

__all__ = ["TFCheckpoint", "convert", "import_tf", "build_model", "crc32c", "resolve_prefix"]

FORMAT_VERSION = 1
TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # 2 * BlockHandle::kMaxEncodedLength (20) + 8-byte magic
BLOCK_TRAILER = 5  # compression type byte + masked crc32c of (contents + type)
BUNDLE_VERSION = 1  # kTensorBundleVersion

# tensorflow/core/framework/types.proto -> numpy (little-endian) dtype
_DTYPES = {
    1: "f4",  # DT_FLOAT
    2: "f8",  # DT_DOUBLE
    3: "i4",  # DT_INT32
    4: "u1",  # DT_UINT8
    5: "i2",  # DT_INT16
    6: "i1",  # DT_INT8
    9: "i8",  # DT_INT64
    10: "?",  # DT_BOOL
    14: "bf16",  # DT_BFLOAT16 (read as uint16, widened to float32)
    17: "u2",  # DT_UINT16
    19: "f2",  # DT_HALF
    22: "u4",  # DT_UINT32
    23: "u8",  # DT_UINT64
}
DT_STRING = 7


# ----------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), masked as in tensorflow/tsl/lib/hash/crc32c.h
# ----------------------------------------------------------------------------------------------

_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8


def _make_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _crc_raw_py(data: bytes | memoryview, reg: int) -> int:
    t = _TABLE_LIST
    for b in bytes(data):
        reg = t[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _op_apply(op: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Apply a GF(2)-linear map on 32-bit registers (``op[i]`` = image of bit i) to a vector."""
    out = np.zeros_like(v)
    for i in range(32):
        out ^= op[i] * ((v >> np.uint32(i)) & np.uint32(1))
    return out


def _op_compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _op_apply(a, b)  # (a o b)[i] = a(b[i])


_POW2: list[np.ndarray] = []  # _POW2[k]: feed 2**k zero bytes
_IDENTITY = np.array([1 << i for i in range(32)], dtype=np.uint32)


def _zeros_op(n: int) -> np.ndarray:
    """The GF(2)-linear map 'feed n zero bytes' on the raw (un-inverted) CRC register."""
    if not _POW2:
        _POW2.append((_TABLE[_IDENTITY & np.uint32(0xFF)] ^ (_IDENTITY >> np.uint32(8))).astype(np.uint32))
    result, k = _IDENTITY, 0
    while n:
        while len(_POW2) <= k:
            _POW2.append(_op_compose(_POW2[-1], _POW2[-1]))
        if n & 1:
            result = _op_compose(_POW2[k], result)
        n >>= 1
        k += 1
    return result


def _crc_raw_np(buf: np.ndarray) -> int:
    """Raw register after feeding ``buf`` (uint8) from a zero register, vectorised over chunks.

    Leading zero bytes leave a zero register unchanged, so the buffer is zero-padded at the front to
    ``n`` equal chunks (n a power of two); chunk registers are computed in parallel and combined
    pairwise with the 'shift by L zero bytes' operator.
    """
    size = buf.size
    n = 1 << max(0, math.ceil(math.log2(max(1, size / 512))))
    length = -(-size // n)
    padded = np.zeros(n * length, dtype=np.uint8)
    padded[n * length - size:] = buf
    cols = padded.reshape(n, length).T.copy()  # [L, n], contiguous rows
    reg = np.zeros(n, dtype=np.uint32)
    for j in range(length):
        reg = _TABLE[(reg ^ cols[j]) & np.uint32(0xFF)] ^ (reg >> np.uint32(8))
    while reg.size > 1:
        reg = _op_apply(_zeros_op(length), reg[0::2]) ^ reg[1::2]
        length *= 2
    return int(reg[0])


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data`` (extending ``crc``, the CRC32C of preceding data, as ``crc32c::Extend``)."""
    mv = memoryview(data).cast("B")
    reg = crc ^ 0xFFFFFFFF
    if mv.nbytes < 4096:
        return _crc_raw_py(mv, reg) ^ 0xFFFFFFFF
    seg = 32 << 20
    for start in range(0, mv.nbytes, seg):
        part = np.frombuffer(mv[start:start + seg], dtype=np.uint8)
        shifted = int(_op_apply(_zeros_op(part.size), np.array([reg], dtype=np.uint32))[0])
        reg = shifted ^ _crc_raw_np(part)
    return reg ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Varints, protobuf wire format, SSTable blocks
# ----------------------------------------------------------------------------------------------


class _Corrupt(Exception):
    """Internal: malformed bytes; turned into a CheckpointError naming the file."""


def _varint(buf: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    end = len(buf) if end is None else end
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of a serialized protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > end:
                raise _Corrupt("truncated fixed64 field")
            val = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _Corrupt("truncated length-delimited field")
            val = bytes(buf[pos:pos + n])
            pos += n
        elif wt == 5:
            if pos + 4 > end:
                raise _Corrupt("truncated fixed32 field")
            val = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wt}")
        if num == 0:
            raise _Corrupt("protobuf field number 0")
        yield num, wt, val


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class TensorEntry:
    """A ``BundleEntryProto``: where one tensor's bytes are and what they should be."""

    name: str
    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0  # masked, as stored
    sliced: bool = False

    @classmethod
    def parse(cls, name: str, buf: bytes) -> TensorEntry:
        e = cls(name)
        dims: list[int] = []
        for num, wt, val in _proto_fields(buf):
            if num == 1 and wt == 0:
                e.dtype = val
            elif num == 2 and wt == 2:
                for dnum, dwt, dval in _proto_fields(val):
                    if dnum == 2 and dwt == 2:  # TensorShapeProto.dim
                        size = 0
                        for snum, swt, sval in _proto_fields(dval):
                            if snum == 1 and swt == 0:
                                size = _int64(sval)
                        dims.append(size)
                    elif dnum == 3 and dwt == 0 and dval:
                        raise _Corrupt(f"{name}: tensor of unknown rank")
            elif num == 3 and wt == 0:
                e.shard_id = val
            elif num == 4 and wt == 0:
                e.offset = _int64(val)
            elif num == 5 and wt == 0:
                e.size = _int64(val)
            elif num == 6 and wt == 5:
                e.crc32c = val
            elif num == 7 and wt == 2:
                e.sliced = True
        if any(d < 0 for d in dims) or e.offset < 0 or e.size < 0:
            raise _Corrupt(f"{name}: negative shape, offset or size")
        e.shape = tuple(dims)
        return e


def _block_entries(block: bytes):
    """(key, value) pairs of one SSTable block (leveldb block_builder.cc format)."""
    if len(block) < 4:
        raise _Corrupt("block too small")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 * (num_restarts + 1)
    if num_restarts == 0 or limit < 0:
        raise _Corrupt("bad restart array")
    restarts = struct.unpack_from(f"<{num_restarts}I", block, limit)
    if restarts[0] != 0 or any(r > limit for r in restarts) or list(restarts) != sorted(restarts):
        raise _Corrupt("bad restart points")
    restart_set = set(restarts)
    pos, key = 0, b""
    while pos < limit:
        at_restart = pos in restart_set
        shared, pos = _varint(block, pos, limit)
        non_shared, pos = _varint(block, pos, limit)
        vlen, pos = _varint(block, pos, limit)
        if shared > len(key) or (at_restart and shared) or pos + non_shared + vlen > limit:
            raise _Corrupt("bad block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + vlen]
        pos += vlen


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an uncompressed LevelDB-format table, in file order."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint index ({e.strerror or e})") from None

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; expected a TensorFlow checkpoint index (LevelDB table of BundleEntryProto)")

    if len(data) < FOOTER_SIZE:
        raise fail(f"file too small ({len(data)} bytes) to be a table, truncated?")
    footer = data[-FOOTER_SIZE:]
    lo, hi = struct.unpack_from("<II", footer, FOOTER_SIZE - 8)
    if (hi << 32 | lo) != TABLE_MAGIC:
        raise fail("bad table magic number (not a checkpoint index, or truncated)")
    try:
        mi_off, p = _varint(footer, 0, 40)
        mi_size, p = _varint(footer, p, 40)
        ix_off, p = _varint(footer, p, 40)
        ix_size, p = _varint(footer, p, 40)
    except _Corrupt:
        raise fail("bad block handles in the table footer") from None
    body_end = len(data) - FOOTER_SIZE

    def block(off: int, size: int, what: str) -> bytes:
        if off + size + BLOCK_TRAILER > body_end:
            raise fail(f"{what} block at {off}+{size} lies past the end of the file (truncated)")
        ctype = data[off + size]
        stored = struct.unpack_from("<I", data, off + size + 1)[0]
        if unmask_crc(stored) != crc32c(memoryview(data)[off:off + size + 1]):
            raise fail(f"{what} block checksum mismatch (corrupt file)")
        if ctype == 1:
            raise CheckpointError(f"{path}: {what} block is snappy-compressed, which this reader does not support; "
                                  "expected an uncompressed index as TensorFlow's BundleWriter writes (re-save it with TensorFlow)")
        if ctype != 0:
            raise fail(f"{what} block has unknown compression type {ctype}")
        return data[off:off + size]

    entries: list[tuple[bytes, bytes]] = []
    try:
        block(mi_off, mi_size, "metaindex")
        for _, handle in _block_entries(block(ix_off, ix_size, "index")):
            off, q = _varint(handle, 0)
            size, _ = _varint(handle, q)
            entries.extend(_block_entries(block(off, size, "data")))
    except _Corrupt as e:
        raise fail(f"malformed table ({e})") from None
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if not a < b:
            raise fail("keys are not in sorted order (corrupt file)")
    return entries


# ----------------------------------------------------------------------------------------------
# The checkpoint reader
# ----------------------------------------------------------------------------------------------


def resolve_prefix(path: str | os.PathLike) -> Path:
    """A checkpoint prefix from a prefix, its ``.index``/``.data-*`` file, or a directory.

    A directory may hold a TF ``checkpoint`` state file, exactly one ``*.index``, or be a SavedModel
    (``variables/variables.index``).
    """
    p = Path(path)
    if p.is_dir():
        state = p / "checkpoint"
        if state.is_file():
            m = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.M)
            if m:
                q = Path(m.group(1))
                return q if q.is_absolute() else p / q
        if (p / "variables" / "variables.index").is_file():
            return p / "variables" / "variables"
        found = sorted(p.glob("*.index"))
        if len(found) == 1:
            return found[0].with_suffix("")
        raise CheckpointError(f"{p}: directory holds {len(found)} checkpoint indexes and no 'checkpoint' file; "
                              "expected a TensorFlow checkpoint prefix such as DIR/model.ckpt-250228")
    name = p.name
    if name.endswith(".index"):
        return p.with_name(name[: -len(".index")])
    m = re.match(r"^(.*)\.data-\d{5}-of-\d{5}$", name)
    if m:
        return p.with_name(m.group(1))
    return p


class TFCheckpoint:
    """Read-only view of a TensorFlow checkpoint (tensor bundle), no TensorFlow needed.

    ``ckpt.entries`` maps variable names to :class:`TensorEntry`; ``ckpt.read(name)`` returns the
    tensor as a numpy array after checking its size and CRC32C.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.prefix = resolve_prefix(path)
        self.verify = verify
        self.index_path = Path(f"{self.prefix}.index")
        if not self.index_path.is_file():
            raise CheckpointError(f"{self.index_path}: checkpoint index not found; expected a TensorFlow checkpoint "
                                  "prefix such as DIR/model.ckpt-250228 (with .index and .data-00000-of-00001 files)")
        table = _read_table(self.index_path)
        if not table or table[0][0] != b"":
            raise CheckpointError(f"{self.index_path}: no bundle header entry; expected a TensorFlow checkpoint index")
        try:
            self.num_shards, self.big_endian, min_consumer, bad = 0, False, 0, []
            for num, wt, val in _proto_fields(table[0][1]):
                if num == 1 and wt == 0:
                    self.num_shards = val
                elif num == 2 and wt == 0:
                    self.big_endian = val == 1
                elif num == 3 and wt == 2:
                    for vnum, vwt, vval in _proto_fields(val):
                        if vnum == 2 and vwt == 0:
                            min_consumer = vval
                        elif vnum == 3 and vwt == 0:
                            bad.append(vval)
            self.entries: dict[str, TensorEntry] = {}
            for key, value in table[1:]:
                name = key.decode("utf-8", errors="replace")
                self.entries[name] = TensorEntry.parse(name, value)
        except _Corrupt as e:
            raise CheckpointError(f"{self.index_path}: malformed bundle entry ({e}); expected a TensorFlow checkpoint index") from None
        if self.num_shards < 1:
            raise CheckpointError(f"{self.index_path}: bundle header has {self.num_shards} shards; expected at least 1")
        if min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in bad:
            raise CheckpointError(f"{self.index_path}: checkpoint format version needs a reader >= {min_consumer}; "
                                  f"this reader implements version {BUNDLE_VERSION}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def data_path(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointError(f"{self.index_path}: no variable {name!r} in this checkpoint")
        e = self.entries[name]
        if e.sliced:
            raise CheckpointError(f"{self.index_path}: {name} is saved as partitioned slices, which this reader does not support")
        if e.dtype == DT_STRING:
            raise CheckpointError(f"{self.index_path}: {name} is a string tensor; expected a numeric variable")
        if e.dtype not in _DTYPES:
            raise CheckpointError(f"{self.index_path}: {name} has unsupported TF dtype enum {e.dtype}")
        if not 0 <= e.shard_id < self.num_shards:
            raise CheckpointError(f"{self.index_path}: {name} refers to shard {e.shard_id} of {self.num_shards}")
        code = _DTYPES[e.dtype]
        np_dtype = np.dtype("<u2" if code == "bf16" else ("<" + code if code != "?" else "?"))
        if self.big_endian:
            np_dtype = np_dtype.newbyteorder(">")
        count = math.prod(e.shape)
        path = self.data_path(e.shard_id)
        if e.size != count * np_dtype.itemsize:
            raise CheckpointError(f"{self.index_path}: {name} has {e.size} bytes for shape {list(e.shape)}; "
                                  f"expected {count * np_dtype.itemsize} (corrupt index)")
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                file_size = f.tell()
                if e.offset + e.size > file_size:
                    raise CheckpointError(f"{path}: {file_size} bytes but {name} ends at byte {e.offset + e.size}; "
                                          "the data file is truncated")
                f.seek(e.offset)
                buf = bytearray(e.size)
                if f.readinto(buf) != e.size:
                    raise CheckpointError(f"{path}: short read of {name}; the data file is truncated")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: checkpoint data file not found; expected it next to {self.index_path.name}") from None
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read checkpoint data ({err.strerror or err})") from None
        if self.verify and unmask_crc(e.crc32c) != crc32c(buf):
            raise CheckpointError(f"{path}: checksum mismatch for {name}; the data file is corrupt")
        arr = np.frombuffer(buf, dtype=np_dtype, count=count).reshape(e.shape)
        if code == "bf16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(arr.dtype.newbyteorder("=")) if self.big_endian else arr


# ----------------------------------------------------------------------------------------------
# Official variable names -> canonical structure
# ----------------------------------------------------------------------------------------------

BN_ATTRS = ("gamma", "beta", "moving_mean", "moving_variance")
BN_TO_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}

_SLOT_LEAVES = {"Momentum", "Adam", "Adam_1", "RMSProp", "RMSProp_1", "ExponentialMovingAverage", "Momentum_1"}
_IGNORED_NAMES = {"global_step", "beta1_power", "beta2_power", "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _is_bookkeeping(name: str) -> bool:
    """Optimizer slots, step counters and the object graph: never part of the model."""
    if name in _IGNORED_NAMES or "LARSOptimizer" in name or ".OPTIMIZER_SLOT" in name:
        return True
    if name.startswith(("optimizer/", "save_counter/", "global_step/")):
        return True
    return name.rsplit("/", 1)[-1] in _SLOT_LEAVES


@dataclass
class _Layout:
    """The checkpoint's variables in our canonical order (TF creation order)."""

    kind: str  # "tf1" | "tf2"
    convs: list[str] = field(default_factory=list)  # kernel names, creation order
    bns: list[dict[str, str]] = field(default_factory=list)  # attr -> name, creation order
    head: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (dense kernel, bn attrs) per layer
    sup: tuple[str, str | None] | None = None  # (kernel, bias)
    groups: dict[int, int] | None = None  # TF2 only: blocks per group
    used_scope: set[str] = field(default_factory=set)  # names consumed by this layout


def _ordered_bns(found: dict[Any, dict[str, str]], where: Path) -> list[dict[str, str]]:
    out = []
    for key in sorted(found):
        attrs = found[key]
        missing = [a for a in ("gamma", "moving_mean", "moving_variance") if a not in attrs]
        if missing:
            raise CheckpointError(f"{where}: batch norm {key} lacks {missing[0]}; expected gamma, beta, moving_mean, moving_variance")
        out.append(attrs)
    return out


def _layout_tf1(names: list[str], ema: bool, where: Path) -> _Layout:
    pre = "ema_model/" if ema else ""
    conv_re = re.compile(rf"^{pre}base_model/conv2d(?:_(\d+))?/kernel$")
    bn_re = re.compile(rf"^{pre}base_model/batch_normalization(?:_(\d+))?/(gamma|beta|moving_mean|moving_variance)$")
    head_re = re.compile(rf"^{pre}head_contrastive/(nl|l)_(\d+)/(dense/kernel|batch_normalization/(gamma|beta|moving_mean|moving_variance))$")
    sup_re = re.compile(r"^head_supervised/linear_layer/dense/(kernel|bias)$")
    lay = _Layout("tf1")
    convs: dict[int, str] = {}
    bns: dict[int, dict[str, str]] = {}
    head: dict[int, dict[str, str]] = {}
    sup: dict[str, str] = {}
    for n in names:
        if _is_bookkeeping(n):
            continue
        if m := conv_re.match(n):
            convs[int(m.group(1) or 0)] = n
        elif m := bn_re.match(n):
            bns.setdefault(int(m.group(1) or 0), {})[m.group(2)] = n
        elif m := head_re.match(n):
            slot = head.setdefault(int(m.group(2)), {})
            slot["kernel" if m.group(3) == "dense/kernel" else m.group(4)] = n
        elif m := sup_re.match(n):
            sup[m.group(1)] = n
        elif n.startswith(f"{pre}base_model/") or n.startswith(f"{pre}head_contrastive/"):
            raise CheckpointError(f"{where}: unsupported variable {n}; expected only conv2d/batch_normalization "
                                  "variables in base_model/ and nl_J dense + batch_normalization in head_contrastive/")
        else:
            continue
        lay.used_scope.add(n)
    lay.convs = [convs[i] for i in sorted(convs)]
    lay.bns = _ordered_bns(bns, where)
    lay.head = _ordered_head(head, where)
    lay.sup = (sup["kernel"], sup.get("bias")) if "kernel" in sup else None
    return lay


def _ordered_head(head: dict[int, dict[str, str]], where: Path) -> list[tuple[str, dict[str, str]]]:
    if sorted(head) != list(range(len(head))):
        raise CheckpointError(f"{where}: projection head layers {sorted(head)}; expected consecutive layers from 0")
    out = []
    for j in range(len(head)):
        slot = dict(head[j])
        if "kernel" not in slot:
            raise CheckpointError(f"{where}: projection head layer {j} has no dense kernel")
        kernel = slot.pop("kernel")
        out.append((kernel, _ordered_bns({j: slot}, where)[0]))
    return out


_SK_SUB = {"conv2d_fixed_padding/conv2d": 0, "batch_norm_relu/bn": 1, "conv2d_0": 2, "batch_norm_relu_1/bn": 3, "conv2d_1": 4}


def _layout_tf2(names: list[str], where: Path) -> _Layout:
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    attrs = "(gamma|beta|moving_mean|moving_variance)"
    stem_re = re.compile(rf"^(.*)resnet_model/initial_conv_relu_max_pool/(\d+)/(conv2d/kernel|bn/{attrs})$")
    block_re = re.compile(r"^(.*)resnet_model/block_groups/(\d+)/layers/(\d+)/(projection_layers|conv_relu_dropblock_layers)/(\d+)/(.+)$")
    sub_re = re.compile(rf"^(?:(conv2d_fixed_padding/conv2d|conv2d_0|conv2d_1|conv2d)/kernel|(batch_norm_relu/bn|batch_norm_relu_1/bn|bn)/{attrs})$")
    head_re = re.compile(rf"^(.*)_projection_head/linear_layers/(\d+)/(dense/kernel|bn_relu/bn/{attrs})$")
    sup_re = re.compile(r"^(.*)supervised_head/linear_layer/dense/(kernel|bias)$")
    lay = _Layout("tf2")
    convs: dict[tuple, str] = {}
    bns: dict[tuple, dict[str, str]] = {}
    head: dict[int, dict[str, str]] = {}
    sup: dict[str, str] = {}
    roots: set[str] = set()
    groups: dict[int, set[int]] = {}
    for full in names:
        if not full.endswith(suffix) or _is_bookkeeping(full):
            continue
        n = full[: -len(suffix)]
        if m := stem_re.match(n):
            roots.add(m.group(1))
            key = (0, 0, 0, 0, int(m.group(2)), 0)
            if m.group(3) == "conv2d/kernel":
                convs[key] = full
            else:
                bns.setdefault(key, {})[m.group(4)] = full
        elif m := block_re.match(n):
            roots.add(m.group(1))
            g, b = int(m.group(2)), int(m.group(3))
            groups.setdefault(g, set()).add(b)
            sm = sub_re.match(m.group(6))
            if not sm:
                raise CheckpointError(f"{where}: unsupported variable {full}; expected conv2d kernels and bn variables "
                                      "(SE layers and other variants are not supported)")
            sub = _SK_SUB.get(sm.group(1) or sm.group(2), 0)
            key = (1, g, b, 0 if m.group(4) == "projection_layers" else 1, int(m.group(5)), sub)
            if sm.group(1):
                convs[key] = full
            else:
                bns.setdefault(key, {})[sm.group(3)] = full
        elif m := head_re.match(n):
            roots.add(m.group(1))
            slot = head.setdefault(int(m.group(2)), {})
            slot["kernel" if m.group(3) == "dense/kernel" else m.group(4)] = full
        elif m := sup_re.match(n):
            roots.add(m.group(1))
            sup[m.group(2)] = full
        elif "resnet_model/" in n or "_projection_head/" in n:
            raise CheckpointError(f"{where}: unsupported variable {full}; expected the tf2/resnet.py + tf2/model.py layers")
        else:
            continue
        lay.used_scope.add(full)
    if len(roots) > 1:
        raise CheckpointError(f"{where}: model variables under several roots {sorted(roots)}; expected one model")
    lay.convs = [convs[k] for k in sorted(convs)]
    lay.bns = _ordered_bns(bns, where)
    lay.head = _ordered_head(head, where)
    lay.sup = (sup["kernel"], sup.get("bias")) if "kernel" in sup else None
    lay.groups = {g: len(bs) for g, bs in groups.items()}
    return lay


def _encoder_order(encoder: nn.Module) -> tuple[list[str], list[str]]:
    """Our conv and BN module names in the order TF creates them (stem; per block: projection
    shortcut conv+BN, conv1, BN1, SK conv/BN/fc1/fc_bn/fc2 or conv2+BN2, conv3, BN3)."""
    convs: list[str] = []
    bns: list[str] = []
    if encoder.conv1 is not None:
        convs.append("conv1")
    else:
        for i, m in enumerate(encoder.stem):
            if isinstance(m, nn.Conv2d):
                convs.append(f"stem.{i}")
            elif isinstance(m, nn.BatchNorm2d):
                bns.append(f"stem.{i}")
    bns.append("bn1")
    for li in range(1, 5):
        for bi, blk in enumerate(getattr(encoder, f"layer{li}")):
            p = f"layer{li}.{bi}"
            if blk.downsample is not None:
                for i, m in enumerate(blk.downsample):
                    if isinstance(m, nn.Conv2d):
                        convs.append(f"{p}.downsample.{i}")
                    elif isinstance(m, nn.BatchNorm2d):
                        bns.append(f"{p}.downsample.{i}")
            convs.append(f"{p}.conv1")
            bns.append(f"{p}.bn1")
            if isinstance(blk.conv2, SelectiveKernel):
                convs += [f"{p}.conv2.conv", f"{p}.conv2.fc1", f"{p}.conv2.fc2"]
                bns += [f"{p}.conv2.bn", f"{p}.conv2.fc_bn"]
            else:
                convs.append(f"{p}.conv2")
                bns.append(f"{p}.bn2")
            if hasattr(blk, "conv3"):
                convs.append(f"{p}.conv3")
                bns.append(f"{p}.bn3")
    return convs, bns


def _infer_encoder(ck: TFCheckpoint, lay: _Layout) -> dict[str, Any]:
    where = ck.index_path
    n_conv, n_bn = len(lay.convs), len(lay.bns)
    if n_conv == 0:
        raise CheckpointError(f"{where}: no encoder variables (base_model/conv2d*/kernel or resnet_model/...); "
                              "expected a SimCLR / SimCLRv2 checkpoint")
    matches = []
    for depth, (kind, blocks) in STAGES.items():
        if kind != "bottleneck":
            continue
        nb = sum(blocks)
        for sk in (False, True):
            for stem in ((1, 3) if sk else (1,)):
                if (n_conv, n_bn) == (stem + (5 if sk else 3) * nb + 4, stem + (4 if sk else 3) * nb + 4):
                    matches.append((depth, sk, stem))
    if len(matches) != 1:
        raise CheckpointError(f"{where}: {n_conv} conv kernels and {n_bn} batch norms do not match a ResNet-50/101/152 "
                              "with or without selective kernels (ResNet-18/34 checkpoints are not supported)")
    depth, sk, stem = matches[0]
    if lay.groups is not None and [lay.groups.get(g, 0) for g in range(4)] != STAGES[depth][1]:
        raise CheckpointError(f"{where}: blocks per group {[lay.groups.get(g, 0) for g in range(4)]} do not match ResNet-{depth}")
    first = ck.shape(lay.convs[0])
    if len(first) != 4:
        raise CheckpointError(f"{where}: {lay.convs[0]} has shape {list(first)}; expected a 4-D HWIO conv kernel")
    small = stem == 1 and first[0] == 3  # CIFAR stem: one 3x3 stride-1 conv (TF cifar_stem, image_size <= 32)
    proj = ck.shape(lay.convs[stem])  # first block's projection shortcut: [1, 1, 64w, 256w]
    width = proj[-1] / 256
    width = int(width) if float(width).is_integer() else width
    return dict(depth=depth, sk=sk, small_images=small, width=width)


def _bn_state(ck: TFCheckpoint, attrs: dict[str, str], prefix: str, used: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for a in BN_ATTRS:
        if a in attrs:
            out[f"{prefix}.{BN_TO_TORCH[a]}"] = _tensor(ck, attrs[a], "vector", used)
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def _tensor(ck: TFCheckpoint, name: str, how: str, used: set[str]) -> torch.Tensor:
    arr = ck.read(name)
    if how == "conv":
        if arr.ndim != 4:
            raise CheckpointError(f"{ck.index_path}: {name} has shape {list(arr.shape)}; expected a 4-D HWIO conv kernel")
        arr = arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif how == "dense":
        if arr.ndim != 2:
            raise CheckpointError(f"{ck.index_path}: {name} has shape {list(arr.shape)}; expected a 2-D dense kernel [in, out]")
        arr = arr.T  # [in, out] -> [out, in]
    elif arr.ndim != 1:
        raise CheckpointError(f"{ck.index_path}: {name} has shape {list(arr.shape)}; expected a vector")
    used.add(name)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _probe_supported() -> bool:
    return "probe_classes" in inspect.signature(SimCLRModel.__init__).parameters


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Our model for a ``"model"`` spec of an imported checkpoint (same keys as models.factory)."""
    encoder = build_resnet(spec["depth"], spec["width"], in_channels=spec["in_channels"],
                           **sk_options(spec["sk"], spec["small_images"]))
    if spec["kind"] == "simclr":
        if spec.get("num_classes") and _probe_supported():
            return SimCLRModel(encoder, spec["head_layers"], spec["proj_dim"], probe_classes=spec["num_classes"])
        return SimCLRModel(encoder, spec["head_layers"], spec["proj_dim"])
    head = ProjectionHead(encoder.out_dim, spec["head_layers"], spec["proj_dim"]).truncated(spec["head_layer"])
    return Classifier(encoder, spec["num_classes"], head)


_HINTS = (
    (re.compile(r"^finetuned_(1|10)pct$"), "classifier", 1),
    (re.compile(r"^finetuned_100pct$"), "classifier", 0),
    (re.compile(r"^(supervised|distill.*)$"), "classifier", 0),
    (re.compile(r"^pretrained$"), "simclr", 0),
)


def _path_hint(prefix: Path) -> tuple[str, str, int] | None:
    for part in reversed(Path(os.path.abspath(prefix)).parts):
        for pattern, kind, layer in _HINTS:
            if pattern.match(part.lower()):
                return part, kind, layer
    return None


def _convert(path: str | os.PathLike, kind: str | None = None, head_layer: int | None = None,
             ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    ck = TFCheckpoint(path)
    where = ck.index_path
    names = ck.keys()
    is_tf2 = any(n.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for n in names)
    if ema and is_tf2:
        raise CheckpointError(f"{where}: --ema applies to TF1 checkpoints (ema_model/ variables); this is a TF2 object-based checkpoint")
    if ema and not any(n.startswith("ema_model/base_model/") for n in names):
        raise CheckpointError(f"{where}: no ema_model/base_model/ variables; expected an EMA copy when importing with ema=True")
    lay = _layout_tf2(names, where) if is_tf2 else _layout_tf1(names, ema, where)
    arch = _infer_encoder(ck, lay)
    feat = scaled(512, arch["width"]) * 4  # the encoder's output width, 2048w

    head_layers = len(lay.head)
    proj_dim = ck.shape(lay.head[-1][0])[-1] if head_layers else 128
    num_classes = sup_in = None
    if lay.sup is not None:
        kshape = ck.shape(lay.sup[0])
        if len(kshape) != 2:
            raise CheckpointError(f"{where}: {lay.sup[0]} has shape {list(kshape)}; expected a dense kernel [in, classes]")
        sup_in, num_classes = kshape

    hint = _path_hint(ck.prefix)
    if kind is None:
        if lay.sup is None:
            kind, why = "simclr", "no supervised head in the checkpoint"
        elif not head_layers:
            kind, why = "classifier", "supervised head and no projection head"
        elif hint is not None:
            kind, why = hint[1], f"path component {hint[0]!r}"
        else:
            kind, why = "simclr", "projection head present and no kind hint in the path"
    else:
        why = "given"
    if kind not in ("simclr", "classifier"):
        raise ConfigError(f"kind {kind!r} is not supported; expected 'simclr' or 'classifier'")
    if kind == "classifier" and lay.sup is None:
        raise CheckpointError(f"{where}: no head_supervised/linear_layer/dense/kernel; a classifier needs the supervised head")

    info: dict[str, Any] = {"layout": lay.kind, "ema": ema, "kind_source": why}
    if kind == "classifier":
        if head_layer is None:
            if sup_in == proj_dim and proj_dim != feat and head_layers:
                head_layer, src = head_layers, "inferred: the classifier's input is the projection"
            elif not head_layers:
                head_layer, src = 0, "no projection head in the checkpoint"
            elif hint is not None:
                head_layer, src = hint[2], f"default for {hint[0]!r} (TF checkpoints do not store ft_proj_selector)"
            else:
                head_layer, src = 1, "default 1, the SimCLRv2 fine-tuning layer (TF checkpoints do not store ft_proj_selector)"
        else:
            src = "given"
        if not 0 <= head_layer <= head_layers:
            raise ConfigError(f"head_layer {head_layer} is not available; the checkpoint's head has {head_layers} layers (0 to {head_layers})")
        want = proj_dim if head_layer == head_layers and head_layers else feat
        if sup_in != want:
            raise CheckpointError(f"{where}: the supervised head takes {sup_in} inputs but head layer {head_layer} has {want}; "
                                  "pass the head_layer the checkpoint was fine-tuned from")
        info["head_layer_source"] = src
    else:
        if head_layer is not None:
            raise ConfigError("head_layer applies to kind='classifier' only (the checkpoint imports as a 'simclr' model)")
    probe = kind == "simclr" and lay.sup is not None and sup_in == feat and _probe_supported()

    spec = dict(kind=kind, depth=arch["depth"], width=arch["width"], sk=arch["sk"], small_images=arch["small_images"],
                in_channels=3, head_layers=head_layers, proj_dim=int(proj_dim),
                num_classes=int(num_classes) if (kind == "classifier" or probe) else None,
                head_layer=head_layer if kind == "classifier" else None)
    with torch.device("meta"):  # names and shapes only: no memory for (possibly huge) weights
        model = build_model({**spec, "head_layer": spec["head_layer"] or 0})

    used: set[str] = set()
    sd: dict[str, torch.Tensor] = {}
    conv_names, bn_names = _encoder_order(model.encoder)
    if len(conv_names) != len(lay.convs) or len(bn_names) != len(lay.bns):
        raise CheckpointError(f"{where}: {len(lay.convs)} conv kernels and {len(lay.bns)} batch norms; the inferred "
                              f"ResNet-{arch['depth']} has {len(conv_names)} and {len(bn_names)}")
    for tf_name, ours in zip(lay.convs, conv_names):
        sd[f"encoder.{ours}.weight"] = _tensor(ck, tf_name, "conv", used)
    for attrs, ours in zip(lay.bns, bn_names):
        sd.update(_bn_state(ck, attrs, f"encoder.{ours}", used))
    keep = head_layers if kind == "simclr" else head_layer
    for j, (kernel, attrs) in enumerate(lay.head[:keep]):
        sd[f"head.layers.{j}.linear.weight"] = _tensor(ck, kernel, "dense", used)
        sd.update(_bn_state(ck, attrs, f"head.layers.{j}.bn", used))
    if lay.sup is not None and (kind == "classifier" or probe):
        dst = "fc" if kind == "classifier" else "probe"
        sd[f"{dst}.weight"] = _tensor(ck, lay.sup[0], "dense", used)
        if lay.sup[1] is None:
            raise CheckpointError(f"{where}: {lay.sup[0]} has no bias; expected head_supervised/linear_layer/dense/bias")
        sd[f"{dst}.bias"] = _tensor(ck, lay.sup[1], "vector", used)

    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        detail = (f"{wrong[0]} converts to shape {tuple(sd[wrong[0]].shape)}, the model has {tuple(own[wrong[0]].shape)}" if wrong
                  else f"missing {missing[:1]}, unexpected {unexpected[:1]}")
        raise CheckpointError(f"{where}: does not convert to ResNet-{arch['depth']} width {arch['width']} "
                              f"sk={arch['sk']} with a {head_layers}-layer head: {detail}")

    ignored = [n for n in names if _is_bookkeeping(n)]
    unused = sorted(n for n in names if n not in used and not _is_bookkeeping(n))
    step = None
    for n in ("global_step", "global_step/.ATTRIBUTES/VARIABLE_VALUE"):
        if n in ck and ck.entries[n].dtype in (3, 9) and not ck.shape(n):
            step = int(ck.read(n))
    info.update(source=str(Path(os.path.abspath(ck.prefix))), global_step=step, tensors_used=len(used),
                bookkeeping_ignored=len(ignored), unused_count=len(unused), unused_variables=unused[:50])
    config = dict(depth=arch["depth"], width_multiplier=arch["width"], selective_kernel=arch["sk"],
                  head_layers=head_layers, num_classes=spec["num_classes"], proj_dim=int(proj_dim),
                  small_images=arch["small_images"], in_channels=3, kind=kind, head_layer=spec["head_layer"])
    return sd, config, {"spec": spec, **info}


def convert(ckpt_prefix: str | os.PathLike, kind: str | None = None, head_layer: int | None = None,
            ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict of a SimCLRModel or Classifier, config) from an official TF checkpoint.

    ``config``: depth, width_multiplier, selective_kernel, head_layers, num_classes (None without a
    supervised head in the result), proj_dim, small_images, in_channels, kind, head_layer. ``kind``
    None picks it as described in the module docstring; ``ema`` (TF1) imports the ``ema_model/`` copy.
    """
    sd, config, _ = _convert(ckpt_prefix, kind, head_layer, ema)
    return sd, config


# ----------------------------------------------------------------------------------------------
# Our checkpoint format
# ----------------------------------------------------------------------------------------------


def import_tf(ckpt_prefix: str | os.PathLike, out_dir: str | os.PathLike, kind: str | None = None,
              head_layer: int | None = None, ema: bool = False, image_size: int = 224) -> dict[str, Any]:
    """Convert a TF checkpoint and write ``out_dir/final.safetensors`` + ``out_dir/final.json``.

    Tensors are stored as ``model.<state-dict key>`` (the layout the stages load); the JSON (also
    embedded in the safetensors header under ``"simclrv2"``) holds ``kind``, ``config``, ``model``
    (the spec models.factory rebuilds from), ``stage: "import-tf"`` and ``metadata``. Returns the JSON.
    """
    sd, config, info = _convert(ckpt_prefix, kind, head_layer, ema)
    spec = info.pop("spec")
    small = spec["small_images"]
    size = 32 if small and image_size == 224 else image_size
    meta = {
        "format_version": FORMAT_VERSION,
        "stage": "import-tf",
        "kind": spec["kind"],
        "config": dict(depth=spec["depth"], width=spec["width"], sk=spec["sk"], head_layers=spec["head_layers"],
                       proj_dim=spec["proj_dim"], num_classes=spec["num_classes"], image_size=size,
                       in_channels=3, small_images=small, head_layer=spec["head_layer"]),
        "model": {**spec, "head_layer": spec["head_layer"] or 0},
        "image_size": size,
        "complete": True,
        "result": {"tensors": len(sd)},
        "metadata": info,
    }
    from simclrv2 import checkpoint as ckpt

    out = Path(out_dir)
    tensors = {f"model.{k}": v.contiguous() for k, v in sd.items()}
    # the stages' writer: atomic, with the checksum every load verifies
    ckpt.save_checkpoint(out / "final", tensors, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simclrv2.tf_import", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="TF checkpoint prefix (DIR/model.ckpt-N), its .index file, or its directory")
    ap.add_argument("out_dir", help="output directory for final.safetensors + final.json")
    ap.add_argument("--kind", choices=["simclr", "classifier"], default=None)
    ap.add_argument("--head-layer", type=int, default=None)
    ap.add_argument("--ema", action="store_true", help="import the ema_model/ copy (TF1)")
    ap.add_argument("--list", action="store_true", help="only list the checkpoint's variables")
    args = ap.parse_args(argv)
    try:
        if args.list:
            ck = TFCheckpoint(args.checkpoint)
            for name, e in ck.entries.items():
                print(f"{name}\t{list(e.shape)}\tdtype={e.dtype}")
            return 0
        meta = import_tf(args.checkpoint, args.out_dir, args.kind, args.head_layer, args.ema)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = meta["config"]
    print(f"imported {meta['kind']}: ResNet-{c['depth']} width {c['width']} sk={c['sk']} head_layers={c['head_layers']} "
          f"num_classes={c['num_classes']} head_layer={c['head_layer']} -> {Path(args.out_dir) / 'final.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
