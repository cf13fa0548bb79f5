"""The pipeline report's pictures (simclrv2.report): training curves, accuracy vs labels, the feature map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simclrv2.feature_map import embed_2d, feature_map, pipeline_feature_map
from simclrv2.report import _curve_title, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A digits classifier checkpoint (random weights: the map needs no training) and its metrics.jsonl."""
    import torch

    from simclrv2.checkpoint import CheckpointMeta, save_checkpoint
    from simclrv2.metrics import MetricsWriter
    from simclrv2.models import build_model, model_spec

    out = tmp_path_factory.mktemp("report") / "sup"
    torch.manual_seed(0)
    spec = model_spec("classifier", depth=18, width=0.0625, sk=False, small_images=True, in_channels=1,
                      head_layers=0, num_classes=10, head_layer=0, image_size=16)
    model = build_model(spec)
    meta = CheckpointMeta("supervised", spec, classes=[str(i) for i in range(10)], dataset="digits", complete=True)
    save_checkpoint(out / "final", {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    with MetricsWriter(out, tensorboard=False) as m:
        for step in range(1, 7):
            m.write({"step": step, "epoch": step / 2, "loss": 2.3 / step ** 0.5, "lr": 0.1, "images_per_s": 100.0})
    return out


def _report(results):
    return {"dataset": "digits", "preset": "tiny", "results": results, "total_seconds": 3.0,
            "pretrain": {"model": "ResNet-18 (0.125x)", "knn_top1": 50.0, "seconds": 1.0, "params": 190000}}


def _row(stage, fraction, top1, variant=None):
    r = {"stage": stage, "model": "ResNet-18 (0.125x)", "params": 180000, "label_fraction": fraction, "top1": top1,
         "top5": min(100.0, top1 + 20), "seconds": 2.0}
    return {**r, "variant": variant} if variant else r


def test_feature_map_png_report_section_and_reuse(tiny_classifier, tmp_path):
    info = feature_map(tmp_path, tiny_classifier, max_images=200)
    png = tmp_path / "feature_map.png"
    assert png.read_bytes()[:8] == PNG and info["png"] == "feature_map.png"
    assert info["images"] == 200 and info["methods"][0] == "t-SNE" and info["dataset"] == "digits"
    assert "supervised ResNet-18" in info["model"] and "fc" in info["layer"]
    mtime = png.stat().st_mtime_ns
    assert feature_map(tmp_path, tiny_classifier, max_images=200) == info  # same checkpoint: reused, not redrawn
    assert png.stat().st_mtime_ns == mtime

    curves = {"supervised @ 0.1": str(tiny_classifier / "metrics.jsonl")}
    write_report(tmp_path, {**_report([_row("supervised", 0.1, 30.0)]), "feature_map": info}, curves)
    md = (tmp_path / "report.md").read_text()
    assert "## Feature map" in md and "![Feature map](feature_map.png)" in md and "## Training curves" in md
    assert json.loads((tmp_path / "report.json").read_text())["feature_map"]["images"] == 200
    for name in ("training_curves.png", "accuracy_vs_labels.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_pipeline_feature_map_failure_is_a_warning(tmp_path):
    assert pipeline_feature_map(tmp_path, tmp_path / "no_checkpoint") is None
    assert not (tmp_path / "feature_map.png").exists()


def test_accuracy_plot_with_several_fractions_and_curve_titles(tmp_path):
    results = [_row("supervised", f, 20 + 40 * f) for f in (0.01, 0.1)] + \
              [_row("finetune", f, 40 + 30 * f, "head layer 1") for f in (0.01, 0.1)]
    write_report(tmp_path, _report(results), {})
    assert (tmp_path / "accuracy_vs_labels.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "training_curves.png").exists()  # no metrics: no curves, no section
    md = (tmp_path / "report.md").read_text()
    assert "## Training curves" not in md
    # this run's wall time (3 s) and the stages' own times added up: 4 rows x 2 s + pretraining 1 s
    assert "Total time: 3 s for this run; the stages' training times add up to 9 s." in md
    assert _curve_title("finetune-head layer 1 @ 0.1") == "SimCLRv2 fine-tuned (head layer 1), 10% labels"
    assert _curve_title("pretrain") == "SimCLRv2 pretraining"


def test_embed_2d_separates_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 5
    x = np.concatenate([c + rng.normal(size=(40, 64)) for c in centres])
    xy = embed_2d(x, seed=0)
    assert xy.shape == (120, 2)
    means = np.stack([xy[i * 40:(i + 1) * 40].mean(0) for i in range(3)])
    spread = max(xy[i * 40:(i + 1) * 40].std(0).max() for i in range(3))
    assert min(np.linalg.norm(means[i] - means[j]) for i in range(3) for j in range(i)) > 2 * spread
