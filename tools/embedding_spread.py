"""How spread out a pretrained encoder's projections are, and how they sit against its memory queue.

    python3 tools/embedding_spread.py RUN/pretrain [--dataset fashion-mnist] [--pairs 256]

Embeds two augmented views of ``--pairs`` training images with the final weights (train-mode BN, as
in pretraining) and prints the mean cosine between the two views of an image (positives) and
between views of different images (negatives: ~0 for a well spread encoder, high when the
embeddings bunch together). For a run with a memory queue, ``last.safetensors`` holds the EMA
network and the queue: it also prints the mean cosine of the online embeddings to the queued keys
and to the EMA network's embedding of the same view. RESULTS.md (memory queue) used it.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from simclrv2 import checkpoint as ckpt
from simclrv2.data.augment import PretrainAugment
from simclrv2.data.sources import load_dataset
from simclrv2.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a pretraining output directory")
    ap.add_argument("--dataset", default=None, help="default: the checkpoint's")
    ap.add_argument("--pairs", type=int, default=256)
    args = ap.parse_args()
    run = Path(args.run)
    model, meta = load_model(run / "final.safetensors", "simclr")
    cfg = meta.config
    ds = load_dataset(args.dataset or meta.dataset or cfg.get("dataset", "fashion-mnist"), "train")
    g = torch.Generator().manual_seed(0)
    images, _ = ds.get_batch(torch.randperm(len(ds), generator=g)[: args.pairs].numpy())
    augment = PretrainAugment(images.shape[-1], crop_scale=(cfg.get("crop_min", 0.08), 1.0),
                              color_strength=cfg.get("color_strength", 1.0), blur=cfg.get("blur", False))
    views = augment.views(images, g)
    model.train()
    with torch.no_grad():
        u = F.normalize(model(views)[1].float(), dim=1)
    n = u.shape[0] // 2
    sim = u @ u.T
    others = ~torch.eye(2 * n, dtype=torch.bool)
    others[torch.arange(n), torch.arange(n) + n] = others[torch.arange(n) + n, torch.arange(n)] = False
    print(f"positives (two views of an image): {(u[:n] * u[n:]).sum(1).mean():.3f}")
    print(f"negatives (views of different images): {sim[others].mean():.3f}")

    last = run / "last.safetensors"
    tensors = ckpt.load_checkpoint(last)[0] if last.exists() else {}
    if "extra.queue" in tensors:
        ema, _ = load_model(run / "final.safetensors", "simclr")
        ema.load_state_dict({k[len("extra.ema."):]: v for k, v in tensors.items() if k.startswith("extra.ema.")})
        ema.train()
        with torch.no_grad():
            keys = F.normalize(ema(views)[1].float(), dim=1)
        filled = int(tensors["extra.queue_len"])
        queue = F.normalize(tensors["extra.queue"][:filled].float(), dim=1)
        print(f"online vs the EMA network, same view: {(u * keys).sum(1).mean():.3f}")
        print(f"online vs the {filled} queued keys: {(u @ queue.T).mean():.3f}")


if __name__ == "__main__":
    main()
