"""kNN protocol (engine.knn_accuracy), the validation split and tools/knn_eval.py's table."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from simclrv2.data import validation_indices
from simclrv2.engine import knn_accuracy


def brute_force_knn(tr, ytr, te, yte, k, temperature, c):
    """One query at a time: cosine similarities, the k largest, votes exp(sim / T) per class."""
    correct = 0
    for q, y in zip(te.tolist(), yte.tolist()):
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for f, lab in zip(tr.tolist(), ytr.tolist()):
            fn = math.sqrt(sum(v * v for v in f))
            sims.append((sum(a * b for a, b in zip(q, f)) / (qn * fn), lab))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * c
        for s, lab in sims[:k]:
            votes[lab] += math.exp(s / temperature)
        correct += int(max(range(c), key=lambda i: (votes[i], -i)) == y)
    return 100.0 * correct / len(yte)


@pytest.mark.slow
def test_knn_accuracy_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    c = 4
    centres = torch.randn(c, 8, generator=g)
    ytr = torch.randint(0, c, (300,), generator=g)
    yte = torch.randint(0, c, (1500,), generator=g)  # > 1000: two query chunks
    tr = centres[ytr] + 1.5 * torch.randn(300, 8, generator=g)
    te = centres[yte] + 1.5 * torch.randn(1500, 8, generator=g)
    for k in (1, 20, 200, 1000):  # 1000 > neighbours: all of them
        for t in (0.1, 0.5):
            got = knn_accuracy(tr, ytr, te, yte, k=k, temperature=t, num_classes=c)
            assert abs(got - brute_force_knn(tr, ytr, te, yte, min(k, 300), t, c)) < 1e-9, (k, t)
    assert 40 < knn_accuracy(tr, ytr, te, yte, k=20) < 100  # separable enough to be a real check


def test_validation_indices_are_balanced_seeded_and_fixed():
    labels = np.repeat(np.arange(10), 6000)
    np.random.default_rng(1).shuffle(labels)
    v = validation_indices(labels, 5000, seed=0)
    assert len(v) == 5000 and len(np.unique(v)) == 5000 and (np.diff(v) > 0).all()
    assert (np.bincount(labels[v], minlength=10) == 500).all()
    assert (validation_indices(labels, 5000, seed=0) == v).all()
    assert not (validation_indices(labels, 5000, seed=1) == v).all()
    # unequal classes: proportional shares that add up to the size; unknown labels never chosen
    labels2 = np.array([0] * 10 + [1] * 20 + [2] * 3 + [-1] * 5)
    v2 = validation_indices(labels2, 7, seed=0)
    assert len(v2) == 7 and (labels2[v2] >= 0).all()
    assert np.bincount(labels2[v2], minlength=3).tolist() == [2, 4, 1]


def test_knn_table_uses_disjoint_val_queries_and_neighbours():
    spec = importlib.util.spec_from_file_location("knn_eval", Path(__file__).parents[1] / "tools" / "knn_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    f = torch.randn(200, 6, generator=g)
    val = validation_indices(y.numpy(), 40, seed=0)
    row = mod.knn_table(f, y, f[:50], y[:50], val, 4)
    # with k=1 and the queries among the neighbours, a query would find itself: the val split must not
    assert set(row) == {"val_k200", "val_k20", "test_k200", "test_k20"}
    rest = np.setdiff1d(np.arange(200), val)
    assert row["val_k20"] == knn_accuracy(f[rest], y[rest], f[val], y[val], k=20, num_classes=4)
    assert row["test_k20"] == knn_accuracy(f, y, f[:50], y[:50], k=20, num_classes=4)
