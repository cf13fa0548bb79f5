"""The pipeline report: report.json, report.md (a table in the paper's style) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simclrv2.checkpoint import atomic_write_text

STAGE_NAMES = {
    "supervised": "Supervised baseline",
    "pretrain_linear": "SimCLRv2 linear eval",
    "finetune": "SimCLRv2 fine-tuned",
    "distill": "SimCLRv2 distilled",
}


def model_name(spec: dict[str, Any]) -> str:
    w = spec["width"]
    width = f"{w:g}x"
    return f"ResNet-{spec['depth']} ({width}{'+SK' if spec.get('sk') else ''})"


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
    lines += ["", f"Total time: {_fmt_time(report.get('total_seconds', 0))}.", ""]
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
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


def _plot_accuracy(path: Path, report: dict[str, Any]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for r in report["results"]:
        series.setdefault(_labels(r), []).append((r["label_fraction"] * 100, r["top1"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labeled fraction of the training set (%)")
    ax.set_ylabel("top-1 accuracy on the test split (%)")
    ax.set_title(f"{report['dataset']}: accuracy vs labels")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _savefig(fig, path)
    plt.close(fig)
    return True


def _plot_curves(path: Path, curves: dict[str, str]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for name, file in curves.items():
        p = Path(file)
        if p.exists():
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            if rows:
                runs[name] = rows
    if not runs:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        axes[0].plot([r["epoch"] for r in rows], [r["loss"] for r in rows], label=name)
        knn = [(r["epoch"], r["knn"]) for r in rows if "knn" in r]
        if knn:
            axes[1].plot([k[0] for k in knn], [k[1] for k in knn], marker="o", label=f"{name} kNN top-1")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[0].set_title("training loss per stage")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("pretraining epoch")
    axes[1].set_ylabel("kNN top-1 on the test split (%)")
    axes[1].set_title("representation quality during pretraining")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    _savefig(fig, path)
    plt.close(fig)
    return True
