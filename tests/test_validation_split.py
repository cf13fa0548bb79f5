"""--val-size: a class-balanced validation split carved from the training images; labels drawn from the rest."""

import numpy as np

from simclrv2.config import make_config
from simclrv2.data import labeled_subset, validation_indices
from simclrv2.stages.common import prepare_data


def test_labeled_subset_excluding_keeps_the_counts_and_avoids_the_split():
    labels = np.repeat(np.arange(5), 100)
    val = validation_indices(labels, 50, seed=0)
    idx = labeled_subset(labels, fraction=0.1, seed=0, exclude=val)
    assert np.bincount(labels[idx]).tolist() == [10] * 5  # the whole class's 10%, not 10% of the rest
    assert not np.isin(idx, val).any()
    assert (labeled_subset(labels, fraction=0.1, seed=0, exclude=val) == idx).all()
    # no split: the draw is the one of before (existing subsets and results unchanged)
    assert (labeled_subset(labels, fraction=0.1, seed=0, exclude=np.array([], dtype=np.int64))
            == labeled_subset(labels, fraction=0.1, seed=0)).all()


def test_prepare_data_holds_out_the_validation_split(tmp_path):
    cfg = make_config("finetune", out=str(tmp_path), pretrained="x", dataset="digits", label_fraction=0.1, val_size=300)
    data = prepare_data(cfg, tmp_path)
    assert data.val is not None and len(data.val) == 300
    val_ids, lab_ids = set(data.val.ids), set(data.labeled.ids)
    assert not val_ids & lab_ids
    assert len(data.labeled) + len(data.unlabeled) == len(data.train)  # the split's images stay in the pool
    assert (data.unlabeled.labels == -1).all() and (data.val.labels >= 0).all()
    assert (tmp_path / "validation_split.txt").read_text().split() == list(data.val.ids)
    # all labels (fraction 1): everything but the split
    full = prepare_data(make_config("finetune", out="x", pretrained="x", dataset="digits", label_fraction=1.0,
                                    val_size=300))
    assert len(full.labeled) == len(full.train) - 300 and not set(full.labeled.ids) & val_ids
    assert prepare_data(make_config("finetune", out="x", pretrained="x", dataset="digits")).val is None


def test_finetune_reports_the_validation_split(tiny_pretrained, tmp_path):
    from conftest import TINY
    from simclrv2.stages import finetune

    cfg = make_config("finetune", out=str(tmp_path), pretrained=str(tiny_pretrained[0]), epochs=1, batch_size=48,
                      val_size=200, **TINY)
    result = finetune(cfg)
    assert result["val_images"] == 200 and 0 <= result["val_top1"] <= 100 and "top1" in result
