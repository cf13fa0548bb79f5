"""A 2-D map of a model's test-set features (t-SNE; also UMAP when installed), for the report.

This runs the model (as ``simclrv2 evaluate`` does) and the embedding; :mod:`simclrv2.report`
only draws the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simclrv2.checkpoint import atomic_write_text


def _umap_available() -> bool:
    try:
        import umap
    except Exception:  # noqa: BLE001 - optional, and its import can fail in many ways (numba)
        return False
    return hasattr(umap, "UMAP")  # not a leftover namespace folder of an uninstalled package


def embed_2d(features, seed: int = 0, method: str = "t-SNE"):
    """[N, D] features -> [N, 2]: cosine geometry (L2-normalised), PCA to <= 50 dims, then t-SNE or UMAP."""
    import numpy as np
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    n = x.shape[0]
    if method == "UMAP":
        import umap

        return umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1).fit_transform(x)
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    # one OpenMP thread: scikit-learn's OpenMP runtime spin-waits next to torch's, and a few thousand
    # points take seconds on one core but can take minutes with oversubscribed threads
    with threadpool_limits(1, user_api="openmp"):
        return tsne.fit_transform(x)


def feature_map(out: str | Path, checkpoint: str | Path, dataset: str | None = None, data_dir: str | None = None,
                max_images: int = 2000, seed: int = 0, png: str = "feature_map.png") -> dict[str, Any] | None:
    """OUT/feature_map.png: a 2-D map (t-SNE; also UMAP when ``umap-learn`` is installed) of the features of
    up to ``max_images`` test images (a seeded, class-stratified sample) from ``checkpoint``, coloured by class.

    The features are those a classifier's fc sees (the encoder output of a pretrained model), taken as
    ``simclrv2 evaluate`` does. Returns the map's description for report.json (None under torchrun on a
    rank other than 0). A map already made from the same checkpoint file is reused.
    """
    from simclrv2.distributed import is_main_process

    if not is_main_process():
        return None
    import numpy as np
    import torch

    from simclrv2.checkpoint import load_model, resolve
    from simclrv2.data import load_dataset, subset
    from simclrv2.data.folders import folder_dataset
    from simclrv2.data.augment import EvalTransform
    from simclrv2.engine import predict
    from simclrv2.inference import feature_function
    from simclrv2.report import model_name, plot_feature_map
    from simclrv2.runtime import Runtime

    out = Path(out)
    source = resolve(checkpoint)
    model, meta = load_model(source)
    stat = source.stat()
    methods = ["t-SNE"] + (["UMAP"] if _umap_available() else [])
    key = {"checkpoint": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "max_images": max_images,
           "seed": seed, "methods": methods, "dataset": dataset or meta.dataset}
    cache = out / (Path(png).stem + ".json")
    if (out / png).exists() and cache.exists():
        try:
            saved = json.loads(cache.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            return saved["info"]

    if key["dataset"] == "imagefolder":  # decoded as the run decoded them, from its own folders unless data_dir
        run_config = meta.config or {}
        config = run_config if data_dir is None and run_config else {"data_dir": data_dir,
                                                                      "decode_scale": run_config.get("decode_scale")}
        test = folder_dataset(config, "test", meta.image_size, meta.model.in_channels, meta.bit_depth)
    else:
        test = load_dataset(key["dataset"], "test", data_dir, meta.image_size)
    n = len(test)
    if n > max_images:  # stratified: every class keeps its share
        rng = np.random.default_rng(seed)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(test.labels == c))[: int(round(max_images * np.mean(test.labels == c)))]
                                      for c in np.unique(test.labels)]))[:max_images]
        test = subset(test, idx)
    fn, layer = feature_function(model, source=str(source))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    feats, labels = predict(model.to(device), test, Runtime(device, None), EvalTransform(meta.image_size or test.image_size),
                            500, fn=fn)
    maps = {m: embed_2d(feats.numpy(), seed, m) for m in methods}
    spec = meta.model
    stage = meta.stage
    what = {"distill": "self-distilled" if meta.self_distillation else "distilled", "finetune": "fine-tuned",
            "supervised": "supervised", "linear_eval": "linear-eval", "pretrain": "pretrained",
            "import-tf": "imported"}.get(stage, stage or spec.kind)
    layer_name = ("features before the classifier's fc" if spec.kind == "classifier" else "encoder output") + \
        (f", head layer {layer}" if layer else "")
    info = {"png": png, "methods": methods, "images": int(len(test)), "dataset": test.name, "layer": layer_name,
            "model": f"{what} {model_name(spec)}", "checkpoint": str(source)}
    plot_feature_map(out / png, maps, labels.numpy(), list(test.classes),
                     f"{test.name} test set: {info['model']} features ({len(test)} images)")
    atomic_write_text(cache, json.dumps({"key": key, "info": info}, indent=2) + "\n")
    return info


def pipeline_feature_map(out: str | Path, checkpoint: str | Path, dataset: str | None = None,
                         data_dir: str | None = None) -> dict[str, Any] | None:
    """:func:`feature_map` for the pipeline's report: a failure is a warning, never the end of a finished run."""
    from simclrv2.runtime import log

    try:
        return feature_map(out, checkpoint, dataset, data_dir)
    except Exception as e:  # noqa: BLE001 - the stages are done; the report goes on without the map
        log.warning(f"pipeline: no feature map ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
        return None
