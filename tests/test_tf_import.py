"""Importing the official SimCLRv2 TensorFlow checkpoints (simclrv2.tf_import), without TensorFlow.

The fixtures in tests/fixtures/tf_r50_tiny/ are real TF-format checkpoints of a ResNet-50 at width
1/16 (TF1 naming with selective kernels; TF2 object-based naming without), written by
tools/make_tf_fixture.py, a re-implementation of TF's BundleWriter/TableBuilder that shares no code
with the reader. So that writer and reader are not merely consistent with each other, the format
details were checked against the sources:

* leveldb doc/table_format.md: BlockHandle = varint64 offset + varint64 size; the 48-byte footer is
  metaindex handle + index handle, zero-padded to 40 bytes (2 * kMaxEncodedLength), then the fixed64
  magic 0xdb4775248b80fb57; the index block maps a key >= every key of a data block (and < the next
  block's first key) to that block's handle.
* TF tsl/lib/io/block_builder.cc: entry = varint32 shared | varint32 non_shared | varint32 value_len |
  key delta | value, shared == 0 at restart points (every 16 keys), then uint32 restart offsets and
  their uint32 count.
* TF tsl/lib/io/table_builder.cc + format.cc: 5-byte block trailer = compression type (0 none,
  1 snappy) + masked CRC32C of contents + type byte (ReadBlock verifies n + 1 bytes);
  FindShortestSeparator / FindShortSuccessor index keys; index restart interval 1; empty metaindex
  block; footer magic written as two fixed32, low word first; table_options.h block_size 262144.
* TF core/util/tensor_bundle/tensor_bundle.cc: BundleWriter::Finish writes the table with
  kNoCompression; the first entry has key "" and a BundleHeaderProto (num_shards 1, endianness LITTLE,
  version {producer kTensorBundleVersion = 1, min_consumer 0}); entries come from a std::map (sorted
  bytewise); entry crc32c = Mask(crc32c(tensor bytes)); data in PREFIX.data-00000-of-00001 with
  data_alignment 1; string tensors as varint64 lengths + masked crc of the uint32 lengths + bytes.
* TF core/protobuf/tensor_bundle.proto: BundleEntryProto dtype=1, shape=2, shard_id=3, offset=4,
  size=5, crc32c=6 (fixed32), slices=7; BundleHeaderProto num_shards=1, endianness=2, version=3.
* TF tsl/lib/hash/crc32c.h: Mask(crc) = rotate right by 15 + 0xa282ead8. CRC32C itself is checked
  against the RFC 3720 test vectors below; the protobuf bytes against the google.protobuf runtime.

Variable names: TF1 from google-research/simclr resnet.py / model_util.py (creation-ordered
``base_model/conv2d_N``, ``base_model/batch_normalization_N``, ``head_contrastive/nl_J/...``,
``head_supervised/linear_layer/dense/...``; the order Separius/SimCLRv2-Pytorch convert.py relies on),
TF2 from the attribute paths of tf2/resnet.py and tf2/model.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simclrv2.errors import CheckpointError, ConfigError
from simclrv2.models import ModelSpec, build_model, sk_options
from simclrv2.tf_bundle import _read_table, unmask_crc
from simclrv2.tf_import import TFCheckpoint, convert, crc32c, import_tf, main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_tf_fixture", ROOT / "tools" / "make_tf_fixture.py")
fx = importlib.util.module_from_spec(_spec)
sys.modules["make_tf_fixture"] = fx
_spec.loader.exec_module(fx)

FIXTURES = list(fx.FIXTURES)


def _vars(name):
    layout, kwargs, _ = fx.FIXTURES[name]
    return fx.network_variables(layout, **kwargs)


def _expected(var) -> torch.Tensor:
    arr = var.array
    if var.how == "conv":
        arr = arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif var.how == "dense":
        arr = arr.T  # [in, out] -> [out, in]
    return torch.from_numpy(np.ascontiguousarray(arr))


# ------------------------------------------------------------------------------------------------
# The format
# ------------------------------------------------------------------------------------------------


def test_crc32c_vectors_and_both_implementations_agree():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert fx.crc32c(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    for n in (0, 1, 4095, 4096, 70001):  # pure-Python and vectorised paths
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == fx.crc32c(data)
        assert crc32c(data[n // 3:], crc32c(data[: n // 3])) == crc32c(data)
    assert unmask_crc(fx.mask(0x12345678)) == 0x12345678


def test_committed_fixtures_are_what_the_generator_writes(tmp_path):
    for name in FIXTURES:
        layout, kwargs, fname = fx.FIXTURES[name]
        fx.write_network(tmp_path / name / fname, layout, **kwargs)
        for suffix in (".index", ".data-00000-of-00001"):
            committed = Path(f"{fx.fixture_prefix(name)}{suffix}").read_bytes()
            assert committed == Path(f"{tmp_path / name / fname}{suffix}").read_bytes(), (name, suffix)
    total = sum(p.stat().st_size for p in fx.FIXTURE_DIR.rglob("*") if p.is_file())
    assert total < 2_000_000


@pytest.mark.parametrize("name", FIXTURES)
def test_reader_returns_every_tensor_as_written(name):
    variables = _vars(name)
    ck = TFCheckpoint(fx.fixture_prefix(name))
    extra = {"_CHECKPOINTABLE_OBJECT_GRAPH"} if name.startswith("tf2") else set()
    assert set(ck.keys()) == {v.name for v in variables} | extra
    assert ck.num_shards == 1 and not ck.big_endian
    for v in variables:
        got = ck.read(v.name)
        assert got.dtype == v.array.dtype and got.shape == v.array.shape, v.name
        assert np.array_equal(got, v.array), v.name


def test_index_bytes_match_the_protobuf_runtime():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="bundle_check.proto", package="t", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for fname, num, typ, label, tname in fields:
            fd = m.field.add(name=fname, number=num, type=typ, label=label)
            if tname:
                fd.type_name = tname

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("Dim", [("size", 1, T.TYPE_INT64, opt, None), ("name", 2, T.TYPE_STRING, opt, None)])
    msg("Shape", [("dim", 2, T.TYPE_MESSAGE, rep, ".t.Dim"), ("unknown_rank", 3, T.TYPE_BOOL, opt, None)])
    msg("Entry", [("dtype", 1, T.TYPE_INT32, opt, None), ("shape", 2, T.TYPE_MESSAGE, opt, ".t.Shape"),
                  ("shard_id", 3, T.TYPE_INT32, opt, None), ("offset", 4, T.TYPE_INT64, opt, None),
                  ("size", 5, T.TYPE_INT64, opt, None), ("crc32c", 6, T.TYPE_FIXED32, opt, None)])
    msg("Version", [("producer", 1, T.TYPE_INT32, opt, None), ("min_consumer", 2, T.TYPE_INT32, opt, None)])
    msg("Header", [("num_shards", 1, T.TYPE_INT32, opt, None), ("endianness", 2, T.TYPE_INT32, opt, None),
                   ("version", 3, T.TYPE_MESSAGE, opt, ".t.Version")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    Entry = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Entry"))
    Header = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Header"))

    for name in FIXTURES:
        prefix = fx.fixture_prefix(name)
        table = _read_table(Path(f"{prefix}.index"))
        header = Header.FromString(table[0][1])
        assert (header.num_shards, header.endianness, header.version.producer, header.version.min_consumer) == (1, 0, 1, 0)
        assert header.SerializeToString() == table[0][1]
        ck = TFCheckpoint(prefix)
        for key, value in table[1:]:
            e, ours = Entry.FromString(value), ck.entries[key.decode()]
            assert (e.dtype, tuple(d.size for d in e.shape.dim), e.shard_id, e.offset, e.size, e.crc32c) == (
                ours.dtype, ours.shape, ours.shard_id, ours.offset, ours.size, ours.crc32c)
            assert e.SerializeToString() == value  # the writer's proto3 bytes are canonical


def test_multi_block_index_with_restarts(tmp_path):
    variables = fx.write_network(tmp_path / "m" / "model.ckpt-3", "tf1", depth=50, width=1 / 16, sk=False,
                                 num_classes=None, seed=5, table_options=dict(block_size=512, restart_interval=4))
    index = (tmp_path / "m" / "model.ckpt-3.index").read_bytes()
    assert len(index) > 512 * 8  # many data blocks
    ck = TFCheckpoint(tmp_path / "m" / "model.ckpt-3")
    assert set(ck.keys()) == {v.name for v in variables}
    for v in variables[::7]:
        assert np.array_equal(ck.read(v.name), v.array)


# ------------------------------------------------------------------------------------------------
# The conversion
# ------------------------------------------------------------------------------------------------


def _check_converted(sd, variables, kind, head_layer=None):
    """Each converted tensor equals the array written, in our layout, at the expected key."""
    expected = {}
    for v in variables:
        if v.torch_key is None:
            continue
        key = v.torch_key
        if key.startswith("fc.") and kind == "simclr":
            key = "probe." + key[3:]
        if key.startswith("head.layers.") and kind == "classifier" and int(key.split(".")[2]) >= head_layer:
            continue
        expected[key] = _expected(v)
    real = {k: t for k, t in sd.items() if not k.endswith("num_batches_tracked")}
    assert set(real) == set(expected)
    for key, want in expected.items():
        assert sd[key].dtype == torch.float32 and sd[key].shape == want.shape, key
        assert torch.equal(sd[key], want), key


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("kind", ["simclr", "classifier"])
def test_every_tensor_lands_in_place_and_the_model_runs(name, kind):
    variables = _vars(name)
    sk = fx.FIXTURES[name][1]["sk"]
    sd, spec = convert(fx.fixture_prefix(name), kind=None if kind == "simclr" else kind)
    head_layer = 1 if kind == "classifier" else 0
    # the SK checkpoint: selective kernels, the ResNet-D stem and average-pool shortcuts; the other: none of them
    expected = ModelSpec(kind, 50, 0.0625, 3, **sk_options(sk), head_layers=3, proj_dim=128, num_classes=10,
                         head_layer=head_layer)
    assert spec == expected
    _check_converted(sd, variables, kind, head_layer)

    model = build_model(expected)
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    if kind == "classifier":
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    else:
        h, z = out[0], out[1]
        assert h.shape == (2, 128) and z.shape == (2, 128) and torch.isfinite(z).all()


def test_import_tf_writes_our_checkpoint(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    name = FIXTURES[0]
    out = tmp_path / "imported"
    meta = import_tf(fx.fixture_prefix(name), out, kind="classifier")
    assert sorted(p.name for p in out.iterdir()) == ["final.json", "final.safetensors"]  # no temporary files
    on_disk = json.loads((out / "final.json").read_text())
    assert on_disk == meta.to_json()
    assert meta.stage == "import-tf" and meta.complete and meta.config == {}  # options of a training run: none
    assert meta.model == ModelSpec("classifier", 50, 0.0625, 3, **sk_options(True), head_layers=3, proj_dim=128,
                                   num_classes=10, head_layer=1, image_size=224)
    md = meta.imported
    assert md["layout"] == "tf1" and md["global_step"] == 8 and md["bookkeeping_ignored"] > 0
    assert md["unused_count"] == 9  # head layers 2 and 3 (kernel + 4 and 3 BN variables) are not used by the logits
    assert all(n.startswith(("head_contrastive/nl_1/", "head_contrastive/nl_2/")) for n in md["unused_variables"])
    tensors = load_file(str(out / "final.safetensors"))
    with safe_open(str(out / "final.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["simclrv2"]) == meta.to_json()
    sd, _ = convert(fx.fixture_prefix(name), kind="classifier")
    assert set(tensors) == {f"model.{k}" for k in sd}
    assert all(torch.equal(tensors[f"model.{k}"], v) for k, v in sd.items())
    model = build_model(meta.model)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()}, strict=True)


def test_import_tf_loads_with_the_project_checkpoint_module(tmp_path):
    from simclrv2 import checkpoint as ckpt
    from simclrv2.models import factory
    for kind in ("simclr", "classifier"):
        import_tf(fx.fixture_prefix(FIXTURES[1]), tmp_path / kind, kind=kind)
        tensors, meta = ckpt.load_checkpoint(tmp_path / kind)
        model = factory.build_model(meta.model)
        ckpt.load_state(model, ckpt.subdict(tensors, "model."), tmp_path / kind, "model")


def test_inference_of_other_architectures(tmp_path):
    # TF1 ResNet-50 without SK or supervised head (a plain pretrained SimCLRv2 model).
    v1 = fx.write_network(tmp_path / "a" / "model.ckpt-1", "tf1", depth=50, width=1 / 16, sk=False, num_classes=None, seed=3)
    sd, spec = convert(tmp_path / "a" / "model.ckpt-1.index")  # the .index path works too
    assert (spec.depth, spec.selective_kernel, spec.stem_type, spec.kind, spec.num_classes) == (50, False, "default", "simclr", None)
    _check_converted(sd, v1, "simclr")
    # TF2 ResNet-101 with SK and a 2-layer head, imported through its directory.
    v2 = fx.write_network(tmp_path / "b" / "ckpt-5", "tf2", depth=101, width=1 / 16, sk=True, head_layers=2,
                          proj_dim=64, num_classes=3, seed=4)
    sd, spec = convert(tmp_path / "b", kind="classifier")
    assert spec == ModelSpec("classifier", 101, 0.0625, 3, **sk_options(True), head_layers=2, proj_dim=64, num_classes=3,
                             head_layer=1)
    _check_converted(sd, v2, "classifier", head_layer=1)
    build_model(spec).load_state_dict(sd, strict=True)
    with pytest.raises(CheckpointError, match="takes 128 inputs but head layer 2 has 64"):
        convert(tmp_path / "b", kind="classifier", head_layer=2)


def test_ema_copy(tmp_path):
    variables = fx.write_network(tmp_path / "model.ckpt-2", "tf1", depth=50, width=1 / 16, sk=False, num_classes=5,
                                 seed=6, ema=True)
    plain, _ = convert(tmp_path / "model.ckpt-2", kind="classifier", head_layer=0)
    ema, _ = convert(tmp_path / "model.ckpt-2", kind="classifier", head_layer=0, ema=True)
    by_name = {v.name: v for v in variables}
    for v in variables:
        if v.name.startswith("ema_model/base_model/"):
            twin = by_name[v.name[len("ema_model/"):]]
            assert torch.equal(ema[twin.torch_key], _expected(v))
            assert torch.equal(plain[twin.torch_key], _expected(twin))
    assert torch.equal(ema["fc.weight"], plain["fc.weight"])  # the supervised head has no EMA copy
    with pytest.raises(CheckpointError, match="ema_model"):
        convert(fx.fixture_prefix(FIXTURES[0]), ema=True)


def test_path_hints_choose_kind_and_head_layer(tmp_path):
    src = fx.fixture_prefix(FIXTURES[0])
    cases = {"pretrained": ("simclr", None), "finetuned_10pct": ("classifier", 1),
             "finetuned_1pct": ("classifier", 1), "finetuned_100pct": ("classifier", 0), "supervised": ("classifier", 0)}
    for hint, (kind, layer) in cases.items():
        dst = tmp_path / hint / "r50_1x_sk1"
        shutil.copytree(src.parent, dst)
        _, spec = convert(dst / src.name)
        assert (spec.kind, spec.head_layer if spec.kind == "classifier" else None) == (kind, layer), hint
    _, spec = convert(src, kind="classifier", head_layer=3)  # at width 1/16 the projection is also 128-d
    assert spec.head_layer == 3
    with pytest.raises(ConfigError, match="head_layer 4"):
        convert(src, kind="classifier", head_layer=4)
    with pytest.raises(ConfigError, match="classifier"):
        convert(src, kind="simclr", head_layer=1)


# ------------------------------------------------------------------------------------------------
# Errors: one line naming the file
# ------------------------------------------------------------------------------------------------


def _raises_naming(path, fn, match=None):
    with pytest.raises(CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    if match:
        assert match in msg, msg
    return msg


@pytest.fixture
def ckpt_copy(tmp_path):
    src = fx.fixture_prefix(FIXTURES[1])
    shutil.copytree(src.parent, tmp_path / "ck")
    prefix = tmp_path / "ck" / src.name
    return prefix, Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001")


def test_missing_checkpoint(tmp_path):
    _raises_naming(tmp_path / "nope", lambda: convert(tmp_path / "nope"), "not found")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    _raises_naming(empty, lambda: convert(empty))


def test_missing_or_truncated_data(ckpt_copy):
    prefix, index, data = ckpt_copy
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    _raises_naming(data, lambda: convert(prefix), "truncated")
    data.unlink()
    _raises_naming(data, lambda: convert(prefix), "not found")


def test_corrupt_data(ckpt_copy):
    prefix, index, data = ckpt_copy
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    data.write_bytes(bytes(raw))
    _raises_naming(data, lambda: convert(prefix), "checksum")


def test_truncated_or_corrupt_index(ckpt_copy):
    prefix, index, data = ckpt_copy
    raw = index.read_bytes()
    index.write_bytes(raw[:-7])
    _raises_naming(index, lambda: convert(prefix))
    index.write_bytes(raw[: len(raw) // 2])
    _raises_naming(index, lambda: convert(prefix))
    index.write_bytes(raw[:20])
    _raises_naming(index, lambda: convert(prefix), "truncated")
    flipped = bytearray(raw)
    flipped[100] ^= 0x01
    index.write_bytes(bytes(flipped))
    _raises_naming(index, lambda: convert(prefix), "checksum")
    index.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _raises_naming(index, lambda: convert(prefix), "magic")


def test_snappy_blocks_are_rejected_clearly(tmp_path):
    fx.write_network(tmp_path / "s", "tf1", depth=50, width=1 / 16, sk=False, num_classes=None,
                     table_options=dict(compression_type=1))
    _raises_naming(Path(f"{tmp_path / 's'}.index"), lambda: convert(tmp_path / "s"), "snappy")


def test_not_a_simclr_checkpoint(tmp_path):
    fx.write_checkpoint(tmp_path / "other", {"dense/kernel": np.zeros((3, 4), np.float32)})
    _raises_naming(Path(f"{tmp_path / 'other'}.index"), lambda: convert(tmp_path / "other"), "encoder")
    assert TFCheckpoint(tmp_path / "other").read("dense/kernel").shape == (3, 4)


def test_cli(tmp_path, capsys):
    assert main([str(fx.fixture_prefix(FIXTURES[1])), str(tmp_path / "o")]) == 0
    assert "imported simclr" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "missing") in err
