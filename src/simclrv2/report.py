"""The pipeline report: report.json, report.md (a table in the paper's style) and PNG plots.

A renderer of results, metrics files and 2-D feature coordinates: it runs no models
(:mod:`simclrv2.feature_map` computes the map it draws)."""

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
    val = [r.get("val_images") for r in report["results"] if r.get("val_top1") is not None]
    lines += ["Top-1 / top-5 accuracy (%) on the test split"
              + (f"; validation top-1 on {max(val):,} training images held out of the labelled draw (the "
                 "split that settings are chosen on)." if val else "."), "",
              "| method | architecture | params | label fraction | top-1 | top-5 |" + (" val top-1 |" if val else "")
              + " time |", "|---|---|---|---|---|---|" + ("---|" if val else "") + "---|"]
    for r in report["results"]:
        method = STAGE_NAMES.get(r["stage"], r["stage"])
        if r.get("variant"):
            method += f" ({r['variant']})"
        v = (f" {r['val_top1']:.2f} |" if r.get("val_top1") is not None else " – |") if val else ""
        lines.append(f"| {method} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['label_fraction'] * 100:g}% | "
                     f"{r['top1']:.2f} | {r['top5']:.2f} |{v} {_fmt_time(r['seconds'])} |")
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

def _class_colors(n: int):
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](i / max(1, n - 1)) for i in range(n)]


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
