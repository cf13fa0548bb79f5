"""The pipeline report: report.json, report.md (a table in the paper's style) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simclrv2.checkpoint import atomic_write_text
from simclrv2.models.spec import ModelSpec

STAGE_NAMES = {
    "supervised": "Supervised baseline",
    "pretrain_linear": "SimCLRv2 linear eval",
    "finetune": "SimCLRv2 fine-tuned",
    "distill": "SimCLRv2 distilled",
}


def model_name(spec: ModelSpec) -> str:
    return f"ResNet-{spec.depth} ({spec.width:g}x{'+SK' if spec.selective_kernel else ''})"


def _fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def write_report(out: Path, report: dict[str, Any], curves: dict[str, str]) -> None:
    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    plots = []
    if _plot_accuracy(out / "accuracy_vs_labels.png", report):
        plots.append(("Top-1 vs label fraction", "accuracy_vs_labels.png"))
    if _plot_curves(out / "training_curves.png", curves):
        plots.append(("Training curves", "training_curves.png"))
    lines = [f"# SimCLRv2 on {report['dataset']} (preset `{report['preset']}`)", ""]
    pre = report.get("pretrain") or {}
    if pre:
        lines += [f"Pretraining: {pre.get('model')}, {pre.get('params', 0) / 1e6:.2f}M parameters, "
                  f"{_fmt_time(pre.get('seconds') or 0)}, kNN top-1 on the test split "
                  f"{pre.get('knn_top1') or float('nan'):.2f}%.", ""]
    lines += ["Top-1 / top-5 accuracy (%) on the test split.", "",
              "| method | architecture | params | label fraction | top-1 | top-5 | time |",
              "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        method = STAGE_NAMES.get(r["stage"], r["stage"])
        if r.get("variant"):
            method += f" ({r['variant']})"
        lines.append(f"| {method} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['label_fraction'] * 100:g}% | "
                     f"{r['top1']:.2f} | {r['top5']:.2f} | {_fmt_time(r['seconds'])} |")
    # the stages' own training times add up to what one uninterrupted run takes; this invocation's wall time
    # is less when it reused stages finished earlier
    stages = sum(r.get("seconds") or 0.0 for r in report.get("results", []))
    stages += (report.get("pretrain") or {}).get("seconds") or 0.0
    lines += ["", f"Total time: {_fmt_time(report.get('total_seconds', 0))} for this run; the stages' training times add "
              f"up to {_fmt_time(stages)}.", ""]
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    fmap = report.get("feature_map")
    if fmap and (out / fmap["png"]).exists():
        lines += ["## Feature map", "",
                  f"{' and '.join(fmap['methods'])} of the features of {fmap['images']} {fmap['dataset']} test images "
                  f"({fmap['layer']}) from the {fmap['model']}, coloured by their true class.", "",
                  f"![Feature map]({fmap['png']})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def _labels(r: dict[str, Any]) -> str:
    name = STAGE_NAMES.get(r["stage"], r["stage"])
    return f"{name} ({r['variant']})" if r.get("variant") else name


def _savefig(fig, path: Path) -> None:
    import io

    from simclrv2.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


_MARKERS = "osD^vP*Xh<>"


def _plot_accuracy(path: Path, report: dict[str, Any]) -> bool:
    """Top-1 per method against the label fraction (lines over fractions; bars when there is one fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for r in report["results"]:
        series.setdefault(_labels(r), []).append((r["label_fraction"] * 100, r["top1"]))
    if not series:
        return False
    fractions = sorted({p[0] for pts in series.values() for p in pts})
    colors = _class_colors(len(series))
    if len(fractions) == 1:
        names = list(series)
        values = [series[n][0][1] for n in names]
        fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(names) + 1.6))
        bars = ax.barh(range(len(names)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3, fontsize=9)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlim(0, min(100.0, max(values) * 1.15 + 1))
        ax.set_xlabel("top-1 accuracy on the test split (%)")
        ax.set_title(f"{report['dataset']}: top-1 with {fractions[0]:g}% of the labels")
        ax.grid(True, axis="x", alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7.0, 4.6))
        for i, (name, pts) in enumerate(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[i % len(_MARKERS)], color=colors[i],
                    label=name, markersize=7, alpha=0.9)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:g}%" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labeled fraction of the training set (log scale)")
        ax.set_ylabel("top-1 accuracy on the test split (%)")
        ax.set_title(f"{report['dataset']}: accuracy vs labels")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    _savefig(fig, path)
    plt.close(fig)
    return True


def _curve_title(name: str) -> str:
    """'finetune-head layer 1 @ 0.1' -> 'SimCLRv2 fine-tuned (head layer 1), 10% labels'."""
    label, _, fraction = name.partition(" @ ")
    stage, _, variant = label.partition("-")
    title = {**STAGE_NAMES, "pretrain": "SimCLRv2 pretraining"}.get(stage, stage)
    if variant:
        title += f" ({variant})"
    if fraction:
        try:
            title += f", {float(fraction) * 100:g}% labels"
        except ValueError:
            title += f" @ {fraction}"
    return title


def _plot_curves(path: Path, curves: dict[str, str]) -> bool:
    """One panel per stage: training loss (and its parts) per epoch; the pretraining kNN top-1 in its own panel."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simclrv2.metrics import read_jsonl

    runs = {name: rows for name, rows in ((n, read_jsonl(f)) for n, f in curves.items()) if rows}
    if not runs:
        return False
    knn = {name: [(r["epoch"], r["knn"]) for r in rows if r.get("knn") is not None] for name, rows in runs.items()}
    knn = {k: v for k, v in knn.items() if v}
    panels = len(runs) + (1 if knn else 0)
    cols = min(3, panels)
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, (name, rows) in zip(flat, runs.items()):
        few = len(rows) <= 40
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["loss"] for r in rows], marker="o" if few else None, markersize=4, label="loss", color="C0")
        for j, part in enumerate(("contrastive", "probe_loss")):
            if any(part in r for r in rows):
                pts = [(r["epoch"], r[part]) for r in rows if part in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", marker="." if few else None,
                        color=f"C{j + 1}", label=part.replace("_", " "))
        ax.set_title(_curve_title(name), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
        if len(ax.lines) > 1:
            ax.legend(fontsize=8)
    if knn:
        ax = flat[len(runs)]
        for name, pts in knn.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_curve_title(name))
        ax.set_title("representation quality during pretraining", fontsize=10)
        ax.set_xlabel("pretraining epoch")
        ax.set_ylabel("kNN top-1 on the test split (%)")
        ax.grid(True, alpha=0.3)
        if len(knn) > 1:
            ax.legend(fontsize=8)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle("Training curves per stage", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    _savefig(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ feature map

def _umap_available() -> bool:
    try:
        import umap
    except Exception:  # noqa: BLE001 - optional, and its import can fail in many ways (numba)
        return False
    return hasattr(umap, "UMAP")  # not a leftover namespace folder of an uninstalled package


def _class_colors(n: int):
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](i / max(1, n - 1)) for i in range(n)]


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


def plot_feature_map(path: Path, maps: dict[str, Any], labels, classes: list[str], title: str) -> None:
    """Scatter plots of 2-D maps ({method: [N, 2]}), one panel per method, coloured by class with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = np.asarray(labels)
    colors = _class_colors(len(classes))
    k = len(maps)
    size = 14 if len(labels) <= 600 else 8 if len(labels) <= 3000 else 4
    fig, axes = plt.subplots(1, k, figsize=(6.2 * k + 1.8, 6.0), squeeze=False)
    for ax, (method, xy) in zip(axes[0], maps.items()):
        for c, name in enumerate(classes):
            sel = labels == c
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colors[c], label=name, alpha=0.8, linewidths=0)
        ax.set_xlabel(f"{method} dimension 1")
        ax.set_ylabel(f"{method} dimension 2")
        ax.set_title(method)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2.5,
               fontsize=9 if len(classes) <= 20 else 6, ncol=1 if len(classes) <= 25 else 2, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    _savefig(fig, path)
    plt.close(fig)


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
    from simclrv2.data.augment import EvalTransform
    from simclrv2.engine import predict
    from simclrv2.inference import feature_function
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
