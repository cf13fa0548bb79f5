"""A reader of TensorFlow's checkpoint format ("tensor bundle") in pure Python (numpy), no TensorFlow.

``PREFIX.index`` is a LevelDB-format SSTable mapping variable names to ``BundleEntryProto``
records (dtype, shape, shard, offset, size, masked CRC32C); ``PREFIX.data-0000i-of-0000N`` hold
the raw little-endian tensor bytes. Every block checksum and every tensor checksum read is
verified. :class:`TFCheckpoint` is the reader; :mod:`simclrv2.tf_import` maps the official
SimCLRv2 variable names onto our models.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclrv2.errors import CheckpointError

__all__ = ["TFCheckpoint", "TensorEntry", "crc32c", "resolve_prefix", "unmask_crc"]

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
