"""Using trained models on image files: features (`embed`), class predictions (`predict`), ONNX
export (`export`) and the official TF checkpoints (`import_tf`). The CLI subcommands of the same
names are thin wrappers around these functions.

Images are prepared with Pillow alone (:func:`simclrv2.data.sources.decode_eval_image`): the whole
image decoded and converted to the model's channels (luma for 1-channel models; images of more than
8 bits scaled by the checkpoint's ``bit_depth``), the evaluation crop (the central square of 87.5% of
the shorter side; the whole image at <= 32 px), one bilinear resize to the checkpoint's
``image_size``, values / 255. An exported ONNX model stores the same recipe in its metadata, so a
user reproduces ``predict`` without this package (README, "Running an exported model").
Inputs are image files or folders (searched recursively for the extensions
in :data:`IMAGE_EXTENSIONS`, hidden entries skipped), in the order given, each folder sorted.

Every output file is written atomically (temporary file, fsync, rename): a failure part-way leaves
no partial output behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2.config import IMPORT_TF_DEFAULTS, INFERENCE_DEFAULTS
from simclrv2.data.augment import EVAL_CROP_ABOVE, EVAL_CROP_FRACTION, to_float_images
from simclrv2.data.sources import IMAGE_EXTENSIONS, _walk_images, decode_eval_image
from simclrv2.errors import ConfigError, DataError
from simclrv2.models.head import Classifier, SimCLRModel
from simclrv2.runtime import Runtime, init_runtime, log

__all__ = ["collect_images", "embed", "export", "feature_function", "import_tf", "load_images", "paths_file", "predict"]


# ------------------------------------------------------------------------------------------ inputs


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image paths from files and folders (recursive), in the order given; a missing path is a DataError."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for item in inputs:
        p = os.fspath(item)
        if os.path.isdir(p):
            found = _walk_images(p)  # paths start with p as given (relative stays relative)
            if not found:
                raise DataError(f"{p}: folder contains no images (extensions: {' '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.isfile(p):
            paths.append(p)
        elif os.path.exists(p):
            raise DataError(f"{p}: not a file or folder")
        else:
            raise DataError(f"{p}: no such file or folder")
    if not paths:
        raise DataError("no images given")
    return paths


def load_images(paths: Sequence[str], image_size: int, channels: int = 3, workers: int | None = None,
                bit_depth: int | None = None) -> torch.Tensor:
    """uint8 [N, channels, S, S]: the evaluation views of ``paths`` (:func:`decode_eval_image`), decoded
    in parallel threads (Pillow releases the GIL); ``bit_depth``: of images of more than 8 bits, as the
    model's run scaled them (checkpoint ``bit_depth``)."""
    if channels not in (1, 3):
        raise ConfigError(f"models take 1 or 3 channels, not {channels}")
    workers = workers or min(8, os.cpu_count() or 1)

    def one(p: str) -> torch.Tensor:
        return decode_eval_image(p, image_size, channels, bit_depth)

    if workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(workers) as pool:
            images = list(pool.map(one, paths))
    else:
        images = [one(p) for p in paths]
    return torch.stack(images)


# ------------------------------------------------------------------------------------------ models


def feature_function(model: nn.Module, head_layer: int | None = None, source: str = "checkpoint") -> tuple[Callable, int]:
    """(fn(model, x) -> features, layer): the encoder output or head layer k of a pretrained model
    (default 0, the encoder), or for a classifier the features its fc sees (default) or an earlier layer.
    ``source`` names the model in errors."""
    if isinstance(model, SimCLRModel):
        layers = len(model.head.layers)
        k = 0 if head_layer is None else head_layer
        if not 0 <= k <= layers:
            raise ConfigError(f"--head-layer {k}: {source} has a {layers}-layer projection head (0 to {layers})")
        if k == 0:
            return (lambda m, x: m.encoder(x)), 0
        return (lambda m, x: m.head.hiddens(m.encoder(x))[k]), k
    if isinstance(model, Classifier):
        layers = model.head_layer
        k = layers if head_layer is None else head_layer
        if not 0 <= k <= layers:
            raise ConfigError(f"--head-layer {k}: the classifier {source} keeps {layers} head layer(s) before its fc (0 to {layers})")
        if k == layers:
            return (lambda m, x: m.features(x)), k
        return (lambda m, x: m.head.hiddens(m.encoder(x))[k]), k
    raise ConfigError(f"{source}: cannot take features of a {type(model).__name__}")


def _open(checkpoint: str | os.PathLike, kind: str | None, device: str | None = None,
          precision: str = "fp32") -> tuple[nn.Module, ckpt.CheckpointMeta, str, Runtime | None]:
    """(model in eval mode, its metadata, its file's name, the runtime: None without ``device``)."""
    model, meta = ckpt.load_model(checkpoint, kind)
    source = str(ckpt.resolve(checkpoint))
    if not meta.image_size:
        raise ConfigError(f"{source}: checkpoint records no image_size")
    if device is None:
        return model.eval(), meta, source, None
    rt = init_runtime(device, precision)
    return model.to(rt.device).eval(), meta, source, rt


def _bar(total: int, desc: str):
    """A tqdm bar over images on a terminal (unless --quiet); None otherwise (no output at all)."""
    if not (sys.stderr.isatty() and log.isEnabledFor(20)):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)


@torch.no_grad()
def _run(model: nn.Module, fn: Callable, paths: list[str], image_size: int, channels: int, rt: Runtime,
         batch_size: int, desc: str, bit_depth: int | None = None) -> torch.Tensor:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    bar = _bar(len(paths), desc)
    outs = []
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            x = to_float_images(load_images(chunk, image_size, channels, bit_depth=bit_depth).to(rt.device))
            with rt.autocast():
                outs.append(fn(model, x).float().cpu())
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(outs)


def paths_file(out: str | os.PathLike) -> Path:
    """The sidecar listing the rows of a features file: feats.npy -> feats.paths.txt."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix == ".npy" else out.name) + ".paths.txt")


# ------------------------------------------------------------------------------------------ API


def embed(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
          head_layer: int | None = None, batch_size: int = INFERENCE_DEFAULTS["batch_size"],
          device: str = INFERENCE_DEFAULTS["device"], precision: str = INFERENCE_DEFAULTS["precision"]) -> dict[str, Any]:
    """Features of image files (float32 [N, D]): the encoder output, head layer ``head_layer`` of a
    pretrained checkpoint, or the features a classifier's fc sees.

    With ``out`` (e.g. ``feats.npy``) the array is saved there and the row order (one path per line)
    next to it (``feats.paths.txt``). Returns features, paths, layer, checkpoint, out, paths_file.
    """
    paths = collect_images(images)
    model, meta, source, rt = _open(checkpoint, None, device, precision)
    fn, layer = feature_function(model, head_layer, source)
    size, channels = meta.image_size, meta.model.in_channels
    feats = _run(model, fn, paths, size, channels, rt, batch_size, "embed",
                 meta.bit_depth).numpy().astype(np.float32, copy=False)
    result: dict[str, Any] = {"features": feats, "paths": paths, "layer": layer, "checkpoint": source,
                              "kind": meta.model.kind, "out": None, "paths_file": None}
    if out is not None:
        buf = io.BytesIO()
        np.save(buf, feats)
        ckpt.atomic_write_bytes(out, buf.getvalue())
        ckpt.atomic_write_text(paths_file(out), "".join(p + "\n" for p in paths))
        result.update(out=str(out), paths_file=str(paths_file(out)))
        log.info(f"embed: {feats.shape[0]} images -> {feats.shape[1]}-d features in {out}")
    return result


def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
            batch_size: int = INFERENCE_DEFAULTS["batch_size"], device: str = INFERENCE_DEFAULTS["device"],
            precision: str = INFERENCE_DEFAULTS["precision"], top_k: int = 5) -> dict[str, Any]:
    """Class predictions of a classifier checkpoint for image files.

    Returns paths, classes, probabilities (float32 [N, C], softmax of the logits), predicted (indices)
    and rows (path, class, probability, top5); with ``out`` also writes them as CSV (columns path,
    class, probability, top5, the latter as ``name:p;name:p;...``, best first).
    """
    paths = collect_images(images)
    model, meta, source, rt = _open(checkpoint, "classifier", device, precision)
    size, channels = meta.image_size, meta.model.in_channels
    logits = _run(model, lambda m, x: m(x), paths, size, channels, rt, batch_size, "predict", meta.bit_depth)
    probs = logits.softmax(dim=1)
    classes = list(meta.classes or [str(i) for i in range(probs.shape[1])])
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    rows = []
    for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist()):
        rows.append({"path": path, "class": classes[idx[0]], "probability": f"{ps[0]:.6f}",
                     "top5": ";".join(f"{classes[i]}:{p:.4f}" for i, p in zip(idx, ps))})
    result = {"paths": paths, "classes": classes, "probabilities": probs.numpy(), "predicted": top_i[:, 0].numpy(),
              "rows": rows, "checkpoint": source, "out": None}
    if out is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["path", "class", "probability", "top5"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        ckpt.atomic_write_text(out, buf.getvalue())
        result["out"] = str(out)
        log.info(f"predict: {len(rows)} images -> {out}")
    return result


def onnx_preprocessing(image_size: int, channels: int, bit_depth: int | None) -> dict[str, Any]:
    """What an exported model's ``simclrv2.preprocessing`` metadata holds: the steps of
    :func:`decode_eval_image` as numbers (README, "Running an exported model", applies them)."""
    return {"input": "images", "layout": "NCHW", "dtype": "float32", "image_size": image_size, "channels": channels,
            "mode": "L" if channels == 1 else "RGB", "bit_depth": bit_depth or 16,
            "crop_fraction": EVAL_CROP_FRACTION, "crop_above": EVAL_CROP_ABOVE,
            "resample": "bilinear", "scale": 255, "output": "logits"}


def onnx_recipe_text(pre: dict[str, Any]) -> str:
    """The preprocessing of ``pre`` in words (the ONNX file's ``simclrv2.recipe`` and doc string)."""
    s = pre["image_size"]
    return (f"Input 'images': float32 [batch, {pre['channels']}, {s}, {s}], values in [0, 1]; output 'logits' "
            f"[batch, classes] (class names: metadata 'simclrv2.classes', a JSON list). Per image, with Pillow: "
            f"open the file (first frame); integer images of more than 8 bits (modes I, I;16*): "
            f"value * 255 / (2**{pre['bit_depth']} - 1), rounded, clipped to 0..255, as 8-bit gray; palette "
            f"images via RGBA; convert to mode {pre['mode']}. Crop: side = min(width, height); if side > "
            f"{pre['crop_above']}, the central square of round({pre['crop_fraction']} * side) pixels (round half "
            f"to even), offsets left = (width - side + 1) // 2, top = (height - side + 1) // 2; else the whole "
            f"image. Resize to {s} x {s} with Image.Resampling.BILINEAR unless already that size. "
            f"numpy float32 / 255, channels first.")


def export(checkpoint: str | os.PathLike, onnx: str | os.PathLike) -> dict[str, Any]:
    """ONNX graph of a classifier checkpoint (fine-tuned, distilled, supervised): float images
    [B, C, S, S] in [0, 1] -> logits [B, classes]. The file's metadata holds the class names
    (``simclrv2.classes``, JSON), the preprocessing that turns an image file into that input
    (``simclrv2.preprocessing``, JSON, and ``simclrv2.recipe`` in words; the steps of ``predict``),
    so ``predict``'s classes are reproduced with Pillow, numpy and onnxruntime alone. The class names
    also go to ``<onnx stem>.classes.txt``, one per line."""
    from simclrv2.export import export_onnx, require_onnx

    require_onnx()  # before loading the checkpoint: the missing extra is the first thing to hear about
    model, meta, source, _ = _open(checkpoint, "classifier")
    size, channels = meta.image_size, meta.model.in_channels
    classes = list(meta.classes or [str(i) for i in range(meta.model.num_classes)])
    pre = onnx_preprocessing(size, channels, meta.bit_depth)
    recipe = onnx_recipe_text(pre)
    metadata = {"simclrv2.classes": json.dumps(classes), "simclrv2.preprocessing": json.dumps(pre),
                "simclrv2.recipe": recipe, "simclrv2.checkpoint": Path(source).name,
                "simclrv2.model": json.dumps(meta.model.to_json())}
    path = export_onnx(model, onnx, size, channels, metadata=metadata, doc=f"simclrv2 classifier. {recipe}")
    names = path.with_name(path.stem + ".classes.txt")
    ckpt.atomic_write_text(names, "".join(c + "\n" for c in classes))
    log.info(f"export: {source} -> {path}")
    return {"onnx": str(path), "checkpoint": source, "image_size": size, "in_channels": channels,
            "input": "images float32 [batch, %d, %d, %d] in [0, 1]" % (channels, size, size),
            "output": f"logits float32 [batch, {len(classes)}]", "classes": classes, "preprocessing": pre,
            "classes_file": str(names)}


def import_tf(checkpoint: str | os.PathLike, out: str | os.PathLike, kind: str | None = None, head_layer: int | None = None,
              ema: bool = False, image_size: int = IMPORT_TF_DEFAULTS["image_size"]) -> dict[str, Any]:
    """Convert an official SimCLRv2 TF checkpoint (prefix, .index file or folder) to ``out/final.*``."""
    from simclrv2 import tf_import

    meta = tf_import.import_tf(checkpoint, out, kind, head_layer, ema, image_size)
    spec = meta.model
    return {"out": str(Path(out) / "final.safetensors"), "kind": spec.kind, "depth": spec.depth, "width": spec.width,
            "sk": spec.selective_kernel, "head_layers": spec.head_layers,
            "head_layer": spec.head_layer if spec.kind == "classifier" else None, "num_classes": spec.num_classes,
            "image_size": meta.image_size, "unused_variables": meta.imported["unused_count"]}
