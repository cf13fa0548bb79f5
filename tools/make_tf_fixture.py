"""Write tiny checkpoints in TensorFlow's checkpoint format with the official SimCLRv2 variable names.

TensorFlow is not installed here, so this is a small re-implementation of what TF's
``BundleWriter`` (tensorflow/core/util/tensor_bundle/tensor_bundle.cc) and ``TableBuilder`` /
``BlockBuilder`` (tensorflow/tsl/lib/io/{table_builder,block_builder,format}.cc) write. It shares no
code with the reader in ``simclrv2.tf_import`` (its own CRC32C, varints, protobuf encoding):

* ``PREFIX.data-00000-of-00001``: the raw little-endian tensor bytes, concatenated (data_alignment 1);
  string tensors as ``varint64 lengths | masked crc32c of the uint32 lengths | bytes``.
* ``PREFIX.index``: a LevelDB-format table (block_size 262144, restart interval 16, index-block
  restart interval 1, no compression). Key ``""`` holds the ``BundleHeaderProto`` (num_shards 1,
  endianness LITTLE, version {producer 1}); every other key (sorted bytewise) a ``BundleEntryProto``
  (dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6 fixed32; proto3 zero fields omitted).
  Each block: entries ``varint shared | varint non_shared | varint value_len | key delta | value``,
  then the restart offsets (fixed32) and their count, then the trailer: compression type byte (0) and
  the masked CRC32C of contents + type byte. Index keys use FindShortestSeparator /
  FindShortSuccessor; the metaindex block is empty; the 48-byte footer is both block handles
  (varints) zero-padded to 40 bytes, then the magic 0xdb4775248b80fb57 as two fixed32 (low, high).

The network description mirrors the official code's layer creation order (TF1: resnet.py,
model_util.py; TF2: tf2/resnet.py, tf2/model.py) and records, for every variable, where it must land in
our PyTorch model, so the tests can check the importer variable by variable.

    python tools/make_tf_fixture.py          # (re)writes tests/fixtures/tf_r50_tiny/
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tf_r50_tiny"

# The committed fixtures: name -> (layout, arguments of network_variables, checkpoint file name)
FIXTURES = {
    "tf1_r50_w1-16_sk1": ("tf1", dict(depth=50, width=1 / 16, sk=True, num_classes=10, seed=1, slots=8, step=8), "model.ckpt-8"),
    "tf2_r50_w1-16_sk0": ("tf2", dict(depth=50, width=1 / 16, sk=False, num_classes=10, seed=2, slots=8, step=1), "ckpt-1"),
}

BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
SK_RATIO, SK_MIN_DIM = 0.0625, 32
DT_FLOAT, DT_STRING, DT_INT64 = 1, 7, 9
TABLE_MAGIC = 0xDB4775248B80FB57


# ------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), bit-by-bit table construction; masked as crc32c::Mask
# ------------------------------------------------------------------------------------------------

def _crc_table() -> list[int]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        out.append(c)
    return out


_CRC_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        crc = (crc >> 8) ^ t[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# Protobuf / varint encoding
# ------------------------------------------------------------------------------------------------

def varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_varint(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v) if v else b""  # proto3: zero scalars are not serialized


def pb_bytes(num: int, payload: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def pb_fixed32(num: int, v: int) -> bytes:
    return varint(num << 3 | 5) + struct.pack("<I", v) if v else b""


def header_proto() -> bytes:
    version = pb_varint(1, 1)  # VersionDef.producer = kTensorBundleVersion (1); min_consumer 0
    return pb_varint(1, 1) + pb_varint(2, 0) + pb_bytes(3, version)  # num_shards 1, LITTLE endian


def entry_proto(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int, shard: int = 0) -> bytes:
    dims = b"".join(pb_bytes(2, pb_varint(1, d)) for d in shape)  # TensorShapeProto.dim {size}
    return (pb_varint(1, dtype) + pb_bytes(2, dims) + pb_varint(3, shard) + pb_varint(4, offset)
            + pb_varint(5, size) + pb_fixed32(6, crc))


# ------------------------------------------------------------------------------------------------
# LevelDB table (TF's TableBuilder)
# ------------------------------------------------------------------------------------------------

class _Block:
    def __init__(self, restart_interval: int):
        self.interval = restart_interval
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last = b""

    def empty(self) -> bool:
        return not self.buf

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            while shared < min(len(self.last), len(key)) and self.last[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        self.last = key
        self.counter += 1

    def finish(self) -> bytes:
        return bytes(self.buf) + b"".join(struct.pack("<I", r) for r in self.restarts) + struct.pack("<I", len(self.restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def write_table(entries: list[tuple[bytes, bytes]], block_size: int = 262144, restart_interval: int = 16,
                compression_type: int = 0) -> bytes:
    """A LevelDB table of ``entries`` (sorted by key), as TF's TableBuilder lays it out.

    ``compression_type`` only sets the trailer's type byte (1 marks a block as snappy without
    compressing it: used to test that readers reject it).
    """
    out = bytearray()
    data, index = _Block(restart_interval), _Block(1)
    pending: tuple[int, int] | None = None
    last = b""

    def write_block(block: _Block) -> tuple[int, int]:
        raw = block.finish()
        handle = (len(out), len(raw))
        trailer = bytes([compression_type])
        out.extend(raw + trailer + struct.pack("<I", mask(crc32c(raw + trailer))))
        block.reset()
        return handle

    for n, (key, value) in enumerate(entries):
        if n and len(key) + len(value) >= 2 * block_size and not data.empty():
            pending = write_block(data)
        if pending is not None:
            index.add(_shortest_separator(last, key), varint(pending[0]) + varint(pending[1]))
            pending = None
        last = key
        data.add(key, value)
        if data.size_estimate() >= block_size:
            pending = write_block(data)
    if not data.empty():
        pending = write_block(data)
    metaindex = write_block(_Block(restart_interval))
    if pending is not None:
        index.add(_short_successor(last), varint(pending[0]) + varint(pending[1]))
    index_handle = write_block(index)
    footer = varint(metaindex[0]) + varint(metaindex[1]) + varint(index_handle[0]) + varint(index_handle[1])
    footer = footer.ljust(40, b"\0") + struct.pack("<II", TABLE_MAGIC & 0xFFFFFFFF, TABLE_MAGIC >> 32)
    return bytes(out + footer)


def write_checkpoint(prefix: str | Path, tensors: dict[str, np.ndarray | bytes], **table_options) -> None:
    """``prefix.index`` + ``prefix.data-00000-of-00001`` for ``tensors`` (numpy arrays; ``bytes`` = a
    scalar DT_STRING tensor), as BundleWriter::Add/Finish do."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray()
    entries = []
    for name in sorted(tensors, key=lambda k: k.encode()):
        val = tensors[name]
        offset = len(data)
        if isinstance(val, bytes):
            lengths = varint(len(val))
            length_crc = crc32c(struct.pack("<I", len(val)))
            masked = struct.pack("<I", mask(length_crc))
            payload = lengths + masked + val
            crc = crc32c(val, crc32c(masked, length_crc))
            dtype, shape = DT_STRING, ()
        else:
            arr = np.asarray(val)  # (np.ascontiguousarray would turn a scalar into shape [1])
            dtype = {np.dtype("float32"): DT_FLOAT, np.dtype("int64"): DT_INT64}[arr.dtype]
            payload = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            crc, shape = crc32c(payload), arr.shape
        data += payload
        entries.append((name.encode(), entry_proto(dtype, shape, offset, len(payload), mask(crc))))
    table = write_table([(b"", header_proto())] + entries, **table_options)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    Path(f"{prefix}.index").write_bytes(table)


# ------------------------------------------------------------------------------------------------
# The official networks' variables, in creation order, with their PyTorch destinations
# ------------------------------------------------------------------------------------------------

@dataclass
class Var:
    name: str  # official TF variable name
    array: np.ndarray  # as TF stores it (conv HWIO, dense [in, out])
    torch_key: str | None  # our state-dict key (None: not a model tensor)
    how: str  # "conv" (HWIO -> OIHW), "dense" (transpose), "vector", "none"


class _Net:
    """Emits variables as the official code creates them, in the TF1 or the TF2 naming."""

    def __init__(self, layout: str, rng: np.random.Generator, ema: bool):
        self.layout, self.rng, self.vars = layout, rng, []
        self.n_conv = self.n_bn = 0
        self.pre = "ema_model/" if ema else ""

    def _tf2(self, path: str) -> str:
        return f"{path}/.ATTRIBUTES/VARIABLE_VALUE"

    def conv(self, k: int, cin: int, cout: int, torch_name: str, tf2_path: str) -> None:
        if self.layout == "tf1":
            name = f"{self.pre}base_model/conv2d{'_%d' % self.n_conv if self.n_conv else ''}/kernel"
        else:
            name = self._tf2(f"model/resnet_model/{tf2_path}/kernel")
        self.n_conv += 1
        w = self.rng.standard_normal((k, k, cin, cout)).astype(np.float32) * np.float32(np.sqrt(2.0 / (k * k * cin)))
        self.vars.append(Var(name, w, f"encoder.{torch_name}.weight", "conv"))

    def bn(self, c: int, torch_name: str, tf2_path: str, zero_init: bool = False) -> None:
        if self.layout == "tf1":
            scope = f"{self.pre}base_model/batch_normalization{'_%d' % self.n_bn if self.n_bn else ''}"
        else:
            scope = f"model/resnet_model/{tf2_path}"
        self.n_bn += 1
        self._bn_vars(scope, c, f"encoder.{torch_name}", center=True, small_gamma=zero_init)

    def _bn_vars(self, scope: str, c: int, torch_prefix: str, center: bool, small_gamma: bool = False) -> None:
        r = self.rng
        gamma = (0.2 if small_gamma else 1.0) + 0.1 * r.standard_normal(c)
        values = {"gamma": gamma, "beta": 0.1 * r.standard_normal(c), "moving_mean": 0.1 * r.standard_normal(c),
                  "moving_variance": r.uniform(0.5, 1.5, c)}
        for attr, dst in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")):
            if attr == "beta" and not center:
                continue
            name = f"{scope}/{attr}" if self.layout == "tf1" else self._tf2(f"{scope}/{attr}")
            self.vars.append(Var(name, values[attr].astype(np.float32), f"{torch_prefix}.{dst}", "vector"))

    def dense(self, name: str, cin: int, cout: int, torch_key: str) -> None:
        w = (self.rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(np.float32)
        self.vars.append(Var(name, w, torch_key, "dense"))


def network_variables(layout: str = "tf1", depth: int = 50, width: float = 1 / 16, sk: bool = True,
                      head_layers: int = 3, proj_dim: int = 128, num_classes: int | None = 10, seed: int = 0,
                      slots: int = 0, step: int = 1, ema: bool = False) -> list[Var]:
    """Every variable of an official SimCLRv2 checkpoint of this architecture, in creation order.

    TF1 names follow resnet.py / model_util.py (``base_model/conv2d_N`` numbered in creation order);
    TF2 names follow the attribute paths of tf2/resnet.py + tf2/model.py. With ``ema`` (TF1) the
    encoder and head are also written under ``ema_model/`` (with different values); ``slots`` adds
    optimizer slots to every ``slots``-th trainable variable; ``global_step`` is always there.
    """
    rng = np.random.default_rng(seed)
    copies = [False, True] if ema else [False]
    out: list[Var] = []
    for is_ema in copies:
        net = _Net(layout, rng, is_ema)
        _resnet(net, depth, width, sk)
        feat = int(round(2048 * width))
        _projection_head(net, feat, head_layers, proj_dim, layout, is_ema)
        if is_ema:
            for v in net.vars:
                v.torch_key = None  # only the non-EMA copy is expected by default
        out += net.vars
    if num_classes:
        k = "head_supervised/linear_layer/dense" if layout == "tf1" else "model/supervised_head/linear_layer/dense"
        net = _Net(layout, rng, False)
        net.dense(k + "/kernel" if layout == "tf1" else net._tf2(k + "/kernel"), int(round(2048 * width)), num_classes, "fc.weight")
        bias_name = k + "/bias" if layout == "tf1" else net._tf2(k + "/bias")
        net.vars.append(Var(bias_name, (0.1 * rng.standard_normal(num_classes)).astype(np.float32), "fc.bias", "vector"))
        out += net.vars
    if slots:  # optimizer slots (momentum) of every ``slots``-th trainable variable
        trainable = [v for v in out if v.name.replace("/.ATTRIBUTES/VARIABLE_VALUE", "").rsplit("/", 1)[-1]
                     in ("kernel", "gamma", "beta", "bias")]
        for v in trainable[::slots]:
            slot = (f"{v.name}/Momentum" if layout == "tf1" else
                    v.name.replace("/.ATTRIBUTES/", "/.OPTIMIZER_SLOT/optimizer/Momentum/.ATTRIBUTES/"))
            out.append(Var(slot, (0.01 * rng.standard_normal(v.array.shape)).astype(np.float32), None, "none"))
    if layout == "tf1":
        out.append(Var("global_step", np.array(step, dtype=np.int64), None, "none"))
    else:
        for name in ("global_step", "save_counter", "optimizer/iter"):
            out.append(Var(f"{name}/.ATTRIBUTES/VARIABLE_VALUE", np.array(step, dtype=np.int64), None, "none"))
    return out


def _scaled(c: int, w: float) -> int:
    return max(1, int(round(c * w)))


def _resnet(net: _Net, depth: int, width: float, sk: bool) -> None:
    # Stem (resnet_v1_generator / Resnet.initial_conv_relu_max_pool).
    stem = "initial_conv_relu_max_pool"
    c64 = _scaled(64, width)
    if sk:  # ResNet-D: 3x3/2 (32w) -> BN-ReLU -> 3x3 (32w) -> BN-ReLU -> 3x3 (64w); list [conv, bn, conv, bn, conv, id, bn, pool, id]
        half = _scaled(32, width)
        net.conv(3, 3, half, "stem.0", f"{stem}/0/conv2d")
        net.bn(half, "stem.1", f"{stem}/1/bn")
        net.conv(3, half, half, "stem.3", f"{stem}/2/conv2d")
        net.bn(half, "stem.4", f"{stem}/3/bn")
        net.conv(3, half, c64, "stem.6", f"{stem}/4/conv2d")
        net.bn(c64, "bn1", f"{stem}/6/bn")
    else:  # 7x7/2; list [conv, id('initial_conv'), bn, pool, id]
        net.conv(7, 3, c64, "conv1", f"{stem}/0/conv2d")
        net.bn(c64, "bn1", f"{stem}/2/bn")
    cin = c64
    for g, n in enumerate(BLOCKS[depth]):
        f = _scaled(64 * 2**g, width)
        stride = 1 if g == 0 else 2
        for b in range(n):
            p, t = f"layer{g + 1}.{b}", f"block_groups/{g}/layers/{b}"
            # bottleneck_block / BottleneckBlock: the projection shortcut is created first.
            if b == 0:
                if sk:  # [FixedPadding if stride > 1], AvgPool, conv 1x1, BN; ours: Sequential(pool|Identity, conv, bn)
                    i = 2 if stride > 1 else 1
                    net.conv(1, cin, 4 * f, f"{p}.downsample.1", f"{t}/projection_layers/{i}/conv2d")
                    net.bn(4 * f, f"{p}.downsample.2", f"{t}/projection_layers/{i + 1}/bn")
                else:
                    net.conv(1, cin, 4 * f, f"{p}.downsample.0", f"{t}/projection_layers/0/conv2d")
                    net.bn(4 * f, f"{p}.downsample.1", f"{t}/projection_layers/1/bn")
            cr = f"{t}/conv_relu_dropblock_layers"
            net.conv(1, cin, f, f"{p}.conv1", f"{cr}/0/conv2d")
            net.bn(f, f"{p}.bn1", f"{cr}/1/bn")  # [2] DropBlock
            if sk:  # [3] SK_Conv2D, [4] DropBlock, [5] conv, [6] bn, [7] DropBlock
                mid = max(int(f * SK_RATIO), SK_MIN_DIM)
                net.conv(3, f, 2 * f, f"{p}.conv2.conv", f"{cr}/3/conv2d_fixed_padding/conv2d")
                net.bn(2 * f, f"{p}.conv2.bn", f"{cr}/3/batch_norm_relu/bn")
                net.conv(1, f, mid, f"{p}.conv2.fc1", f"{cr}/3/conv2d_0")
                net.bn(mid, f"{p}.conv2.fc_bn", f"{cr}/3/batch_norm_relu_1/bn")
                net.conv(1, mid, 2 * f, f"{p}.conv2.fc2", f"{cr}/3/conv2d_1")
                last = 5
            else:  # [3] conv, [4] bn, [5] DropBlock, [6] conv, [7] bn, [8] DropBlock
                net.conv(3, f, f, f"{p}.conv2", f"{cr}/3/conv2d")
                net.bn(f, f"{p}.bn2", f"{cr}/4/bn")
                last = 6
            net.conv(1, f, 4 * f, f"{p}.conv3", f"{cr}/{last}/conv2d")
            net.bn(4 * f, f"{p}.bn3", f"{cr}/{last + 1}/bn", zero_init=True)
            cin = 4 * f


def _projection_head(net: _Net, feat: int, layers: int, proj_dim: int, layout: str, ema: bool) -> None:
    # model_util.projection_head (TF1, scope head_contrastive/nl_J) / tf2 ProjectionHead.linear_layers[J]:
    # dense without bias, then BN (center=True for hidden layers, False for the last one).
    for j in range(layers):
        last = j == layers - 1
        out = proj_dim if last else feat
        if layout == "tf1":
            scope = f"{'ema_model/' if ema else ''}head_contrastive/nl_{j}"
            net.dense(f"{scope}/dense/kernel", feat, out, f"head.layers.{j}.linear.weight")
            net._bn_vars(f"{scope}/batch_normalization", out, f"head.layers.{j}.bn", center=not last)
        else:
            scope = f"model/_projection_head/linear_layers/{j}"
            net.dense(net._tf2(f"{scope}/dense/kernel"), feat, out, f"head.layers.{j}.linear.weight")
            net._bn_vars(f"{scope}/bn_relu/bn", out, f"head.layers.{j}.bn", center=not last)


def write_network(prefix: str | Path, layout: str = "tf1", object_graph: bool | None = None, table_options=None,
                  **kwargs) -> list[Var]:
    """Write the checkpoint of ``network_variables(layout, **kwargs)`` at ``prefix``; returns the variables."""
    variables = network_variables(layout, **kwargs)
    tensors: dict[str, np.ndarray | bytes] = {v.name: v.array for v in variables}
    if object_graph if object_graph is not None else layout == "tf2":
        # A placeholder for the serialized TrackableObjectGraph (a scalar DT_STRING tensor).
        tensors["_CHECKPOINTABLE_OBJECT_GRAPH"] = b"\n\x00placeholder object graph"
    write_checkpoint(prefix, tensors, **(table_options or {}))
    return variables


def fixture_prefix(name: str) -> Path:
    return FIXTURE_DIR / name / FIXTURES[name][2]


def main() -> None:
    for name, (layout, kwargs, _) in FIXTURES.items():
        prefix = fixture_prefix(name)
        write_network(prefix, layout, **kwargs)
        sizes = sum(p.stat().st_size for p in prefix.parent.iterdir())
        print(f"wrote {prefix} ({sizes / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
