"""kNN top-1 of a pretrained encoder under both protocols, on a validation split and on the test split.

    PYTHONPATH=src python3 tools/knn_eval.py RUN/pretrain [RUN2 ...] [--layers 0 3] [--json out.json]

Each checkpoint (a pretraining output directory or a .safetensors file) is loaded with
``load_model(path, "simclr")``; the 60k training and 10k test images are embedded once in eval
mode (``EvalTransform``, fp32, one thread unless ``--threads``) and classified by
``engine.knn_accuracy`` (cosine similarity, votes weighted by exp(sim / T), T = 0.1):

* ``k=200`` -- this project's protocol (``knn_eval`` in stages/pretrain.py with all 60k neighbours);
* ``k=20``  -- the common protocol of SimCLR reimplementations (the reference of issue 17).

Two query/neighbour pairs:

* ``val``  -- 5,000 training images held out (class-balanced, seeded:
  ``simclrv2.data.validation_indices``) as queries, the other 55,000 training images as
  neighbours. Settings are chosen on this.
* ``test`` -- the 10,000 test images as queries, all 60,000 training images as neighbours
  (report only).

``--layers``: the features: 0 is the encoder's output h (default), j > 0 the output of head layer j
(the last layer is the projection z the loss sees).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from simclrv2.data import load_dataset, validation_indices
from simclrv2.data.augment import EvalTransform
from simclrv2.engine import knn_accuracy, predict
from simclrv2.runtime import init_runtime
from simclrv2.checkpoint import load_model

PROTOCOLS = {"k200": 200, "k20": 20}


def knn_table(feats: torch.Tensor, labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
              val_idx: np.ndarray, num_classes: int, temperature: float = 0.1) -> dict[str, float]:
    """{'val_k200', 'val_k20', 'test_k200', 'test_k20'}: kNN top-1 (%) of the four protocol / split pairs."""
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.from_numpy(val_idx)] = True
    out = {}
    for name, k in PROTOCOLS.items():
        out[f"val_{name}"] = knn_accuracy(feats[~is_val], labels[~is_val], feats[is_val], labels[is_val], k=k,
                                          temperature=temperature, num_classes=num_classes)
        out[f"test_{name}"] = knn_accuracy(feats, labels, test_feats, test_labels, k=k, temperature=temperature,
                                           num_classes=num_classes)
    return out


def embed(model, ds, rt, image_size: int, layers: list[int], batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    def fn(m, x):
        hiddens = m.head.hiddens(m.encoder(x))
        return torch.cat([hiddens[j].float() for j in layers], dim=1)

    out, labels = predict(model, ds, rt, EvalTransform(image_size), batch_size, fn=fn)
    widths = [model.encoder.out_dim if j == 0 else model.head.layers[j - 1].linear.out_features for j in layers]
    return list(out.split(widths, dim=1)), labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="pretraining output directories or checkpoint files")
    ap.add_argument("--layers", type=int, nargs="+", default=[0], help="0 = encoder output h (default); j = head layer j")
    ap.add_argument("--dataset", default=None, help="default: the checkpoint's")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0, help="validation split seed (default 0)")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--json", default=None, help="append one JSON line per checkpoint and layer to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rt = init_runtime("cpu", "fp32")
    data_cache = {}
    print(f"{'checkpoint':40s} {'layer':>5s} {'val k200':>9s} {'val k20':>8s} {'test k200':>10s} {'test k20':>9s}")
    for path in args.checkpoints:
        p = Path(path)
        model, meta = load_model(p / "final.safetensors" if p.is_dir() else p, "simclr")
        dataset = args.dataset or meta.dataset or "fashion-mnist"
        size = int(meta.image_size or 28)
        if (dataset, size) not in data_cache:
            train = load_dataset(dataset, "train", args.data_dir, None)
            test = load_dataset(dataset, "test", args.data_dir, None)
            data_cache[(dataset, size)] = (train, test, validation_indices(train.labels, args.val_size, args.seed))
        train, test, val_idx = data_cache[(dataset, size)]
        with torch.no_grad():
            tr, ytr = embed(model, train, rt, size, args.layers, args.batch_size)
            te, yte = embed(model, test, rt, size, args.layers, args.batch_size)
        for j, f_tr, f_te in zip(args.layers, tr, te):
            row = knn_table(f_tr, ytr, f_te, yte, val_idx, len(train.classes), args.temperature)
            print(f"{str(path)[-40:]:40s} {j:5d} {row['val_k200']:9.2f} {row['val_k20']:8.2f} "
                  f"{row['test_k200']:10.2f} {row['test_k20']:9.2f}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"checkpoint": str(path), "layer": j, "val_size": len(val_idx),
                                        "seed": args.seed, "temperature": args.temperature, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
