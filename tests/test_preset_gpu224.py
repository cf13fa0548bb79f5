"""The gpu-224 preset (one GPU, a user's image folder at 224 px), checked without a GPU: every stage
of its pipeline builds a valid config, and its pretraining and fine-tuning run (with the preset's
accumulation, workers: auto, channels_last, precision auto) on a tiny image folder with the image
size, batch, depth and width made small."""

from pathlib import Path

import pytest

from simclrv2 import checkpoint as ckpt
from simclrv2.config import auto_workers, load_preset, make_config, preset_description
from simclrv2.pipeline import plan
from simclrv2.stages import finetune, pretrain
from test_reliability import make_folder, metrics

PRESET = load_preset("gpu-224")


def test_every_stage_of_its_pipeline_has_a_valid_config(tmp_path):
    nodes = plan(PRESET, PRESET["label_fractions"], tmp_path)
    assert [n.stage for n in nodes] == ["pretrain", "supervised", "linear_eval", "finetune", "distill"]
    for node in nodes:
        cfg = node.config
        assert (cfg.image_size, cfg.dataset, cfg.channels_last, cfg.precision) == (224, "imagefolder", True, "auto")
        assert cfg.workers == auto_workers()
        assert cfg.batch_size % cfg.accumulate == 0
    pre = nodes[0].config
    assert (pre.depth, pre.width, pre.sk) == (50, 1.0, False)
    # 1024 images a step as 8 micro-batches of 128 (256 views: ~11 GiB of bf16 activations); lr 0.1 x sqrt(1024)
    assert (pre.batch_size, pre.accumulate, pre.epochs, pre.lr, pre.lr_scaling, pre.temperature) == \
        (1024, 8, 800, 0.1, "sqrt", 0.1)
    description = preset_description("gpu-224")
    assert description.endswith(".") and description.count(". ") == 0 and "224 px" in description


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("photos"), per_class=8, size=24)  # 3 classes x 8 training images


def test_its_pretraining_and_fine_tuning_run_a_step_at_a_tiny_size(folder, tmp_path):
    tiny = dict(data_dir=str(folder), image_size=16, depth=18, width=0.0625, epochs=1, log_every=1)
    cfg = make_config("pretrain", PRESET, out=str(tmp_path / "pre"), batch_size=16, knn_every=0, knn_train_size=24, **tiny)
    assert cfg.accumulate == 8  # the preset's: micro-batches of 2 images, 4 views
    result = pretrain(cfg)
    assert [r["step"] for r in metrics(tmp_path / "pre")] == [1] and result["final_loss"] > 0
    cfg = make_config("finetune", PRESET, out=str(tmp_path / "ft"), pretrained=str(tmp_path / "pre"), batch_size=8,
                      label_fraction=1.0, min_steps=0, **{k: v for k, v in tiny.items() if k not in ("depth", "width")})
    assert cfg.accumulate == 4
    result = finetune(cfg)
    meta = ckpt.read_meta(tmp_path / "ft" / "final.safetensors")
    assert meta.step == meta.total_steps == 3 and meta.config["accumulate"] == 4 and 0 <= result["top1"] <= 100
