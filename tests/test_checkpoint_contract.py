"""The checkpoint contract: typed, versioned metadata (CheckpointMeta, ModelSpec), one writer, one
loader, and checkpoints of format 1 (written by commit b64d9db, tests/fixtures/checkpoints_v1/make.py)
still load, resume and compute what they computed then."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from simclrv2 import checkpoint as ckpt
from simclrv2.checkpoint import CheckpointMeta, load_model
from simclrv2.errors import CheckpointError
from simclrv2.models import ModelSpec, build_model, model_spec, sk_options

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1"
TF = Path(__file__).resolve().parent / "fixtures" / "tf_r50_tiny" / "tf1_r50_w1-16_sk1" / "model.ckpt-8"
# the options make.py trained the format-1 pretraining fixture with
PRETRAIN = dict(depth=18, width=0.0625, epochs=6 * 64 / 1437, batch_size=64, memory_size=200, memory_decay=0.9,
                knn_every=0, temperature=0.5, blur=False, crop_min=0.2, checkpoint_every=2, dataset="digits",
                precision="fp32", label_fraction=0.1, seed=0, log_every=1000, device="cpu")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as make.py ran
    yield
    torch.set_num_threads(n)


def _write_raw(stem: Path, tensors: dict[str, torch.Tensor], text: str) -> Path:
    """A checkpoint file with exactly this metadata text (and its checksum), as any version wrote it."""
    data = save(tensors, metadata={ckpt.META_KEY: text, ckpt.DIGEST_KEY: ckpt.content_digest(text, tensors)})
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".safetensors")
    path.write_bytes(data)
    return path


def test_spec_and_meta_round_trip_through_json(tmp_path):
    spec = ModelSpec("classifier", 50, 0.5, 3, selective_kernel=True, stem_type="default", avg_down=True,
                     head_layers=3, proj_dim=64, num_classes=7, head_layer=2, image_size=96)
    assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    meta = CheckpointMeta("finetune", spec, classes=list("abcdefg"), dataset="imagefolder", config={"lr": 0.1},
                          step=5, total_steps=9, complete=False, metrics={"loss": 1.5}, pretrained="/x/final.safetensors")
    model = build_model(spec)
    ckpt.save_checkpoint(tmp_path / "m", {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    _, loaded = ckpt.load_checkpoint(tmp_path / "m.safetensors")
    assert loaded == meta and loaded.image_size == 96 and loaded.format_version == ckpt.FORMAT_VERSION
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["format_version"] == 2 and on_disk["model"]["stem_type"] == "default" and "teacher" not in on_disk


def test_format_1_spec_translates_sk_and_small_images():
    common = dict(kind="simclr", depth=50, width=1, in_channels=3, head_layers=3, proj_dim=128, num_classes=None,
                  head_layer=0)
    for sk, small, stem in [(True, False, "deep"), (True, True, "small"), (False, True, "small"), (False, False, "default")]:
        spec = ModelSpec.from_json(dict(common, sk=sk, small_images=small), image_size=64, version=1)
        assert (spec.selective_kernel, spec.stem_type, spec.avg_down, spec.image_size) == (sk, stem, sk, 64)
        assert spec == model_spec("simclr", depth=50, width=1, sk=sk, small_images=small, in_channels=3, image_size=64)


def test_format_1_sk_classifier_loads_and_computes_what_it_computed(tmp_path):
    model, meta = load_model(V1 / "supervised_sk.safetensors", "classifier")
    assert meta.format_version == 1 and meta.stage == "supervised" and meta.complete
    assert meta.model == ModelSpec("classifier", 50, 0.03125, 1, **sk_options(True), head_layers=0, num_classes=10,
                                   head_layer=0, image_size=36)
    assert meta.result["stage"] == "supervised" and meta.config["sk"] is True and meta.classes == [str(i) for i in range(10)]
    ref = load_file(str(V1 / "supervised_sk_outputs.safetensors"))  # the logits the format-1 code computed
    with torch.no_grad():
        logits = model.eval()(ref["input"])
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-6)
    # the command line reads it too
    from simclrv2.cli import main

    assert main(["-q", "export", str(V1 / "supervised_sk.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 0


def test_format_1_resume_point_with_memory_queue_continues_to_the_uninterrupted_result(tmp_path, one_thread):
    from simclrv2.config import make_config
    from simclrv2.stages import pretrain

    out = tmp_path / "pre"
    out.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(V1 / f"pretrain_last{suffix}", out / f"last{suffix}")
    old, old_meta = ckpt.load_checkpoint(out / "last.safetensors")
    assert old_meta.format_version == 1 and old_meta.step == 2 and {"extra.queue", "extra.queue_len"} <= old.keys()
    pretrain(make_config("pretrain", out=str(out), **PRETRAIN))  # the same command: it continues the run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 6]  # continued after step 2 (a fresh run would log step 2 too)
    final, meta = ckpt.load_checkpoint(out / "final.safetensors")
    assert meta.format_version == ckpt.FORMAT_VERSION and meta.step == 6 and meta.result is not None
    whole = load_file(str(V1 / "pretrain_final_model.safetensors"))  # the format-1 code's uninterrupted run
    assert whole.keys() == {k for k in final if k.startswith("model.")}
    for k, v in whole.items():  # bit-identical on the machine that wrote them; other CPUs may round differently
        torch.testing.assert_close(final[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_format_1_import_tf_checkpoint_loads(tmp_path):
    from simclrv2.tf_import import convert

    text = (V1 / "import_tf_final.json").read_text().strip()  # the metadata import-tf wrote in format 1
    sd, spec = convert(TF, kind="classifier")
    path = _write_raw(tmp_path / "final", {f"model.{k}": v for k, v in sd.items()}, text)
    model, meta = load_model(path, "classifier")
    old = json.loads(text)
    assert meta.stage == "import-tf" and meta.config == {} and meta.imported == old["metadata"]
    assert meta.model == spec.replace(image_size=224)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_a_newer_format_is_a_one_line_error_saying_to_upgrade(tmp_path, capsys):
    spec = model_spec("classifier", depth=18, width=0.0625, sk=False, small_images=True, in_channels=1,
                      head_layers=0, num_classes=10, image_size=8)
    tensors = {f"model.{k}": v for k, v in build_model(spec).state_dict().items()}
    text = json.dumps(dict(CheckpointMeta("supervised", spec, complete=True).to_json(), format_version=3))
    path = _write_raw(tmp_path / "final", tensors, text)
    for read in (ckpt.read_meta, ckpt.load_checkpoint, load_model):
        with pytest.raises(CheckpointError) as e:
            read(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message and "format 3" in message and "upgrade simclrv2" in message
    from simclrv2.cli import main

    assert main(["-q", "evaluate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upgrade simclrv2" in err[0]


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.pop("format_version"), "format_version"),
    (lambda d: d.update(colour="blue"), "unknown checkpoint metadata 'colour'"),
    (lambda d: d["model"].update(stem_type="tiered"), "invalid model spec"),
    (lambda d: d["model"].update(depth="fifty"), "invalid model spec"),
    (lambda d: d.update(classes=[1, 2]), "invalid classes"),
    (lambda d: d.pop("model"), "no model spec"),
])
def test_malformed_metadata_is_a_one_line_error_naming_the_file(tmp_path, change, needle):
    spec = model_spec("simclr", depth=18, width=0.0625, sk=False, small_images=True, in_channels=1)
    data = CheckpointMeta("pretrain", spec).to_json()
    change(data)
    path = _write_raw(tmp_path / "x", {"model.w": torch.zeros(2)}, json.dumps(data))
    with pytest.raises(CheckpointError, match=needle) as e:
        ckpt.read_meta(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
