"""ONNX export of a classifier: images float [B, C, H, W] in [0, 1] -> logits [B, classes].

The graph has a dynamic batch axis (named ``batch``), opset 17, input ``images`` and output
``logits``, and is exported in eval mode (BatchNorm uses its running statistics). ``metadata``
(string keys and values) goes into the file's ``metadata_props``, which onnxruntime returns as
``session.get_modelmeta().custom_metadata_map``. Writing needs the ``onnx`` package: the ``onnx``
extra (``pip install 'simclrv2[onnx]'``).

Exporter: torch 2.9+ defaults ``torch.onnx.export`` to the torch.export-based ("dynamo") exporter,
which needs ``onnxscript``. The legacy TorchScript exporter (``dynamo=False``, deprecated but present in
torch 2.13) handles these ResNets with no extra dependency and gives a plain opset-17 graph, so it is
tried first; the dynamo exporter is the fallback when the legacy one is unavailable or fails.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from simclrv2.checkpoint import atomic_path
from simclrv2.errors import ConfigError

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _legacy(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(
            model, (example,), path,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def _dynamo(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), opset_version=opset, external_data=False,
        )
    program.save(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def require_onnx():
    """The ``onnx`` module, or a one-line error naming the extra that installs it."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("export needs the onnx package: pip install 'simclrv2[onnx]' (or: pip install onnx)") from None
    return onnx


def _add_metadata(path: str, metadata: dict[str, str], doc: str | None) -> None:
    onnx = require_onnx()
    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    if doc:
        proto.doc_string = doc
    onnx.save(proto, path)


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: int, in_channels: int,
                opset: int = OPSET, metadata: dict[str, str] | None = None, doc: str | None = None) -> Path:
    """Export ``model`` (a Classifier or any images -> logits module) to ONNX at ``path``, atomically,
    with ``metadata`` (key -> text) and ``doc`` (the model's doc string) stored in the file.

    The model is copied to CPU float32 in eval mode first, so the caller's model (device, dtype,
    train/eval mode) is left untouched. Returns the path written.
    """
    if image_size < 1 or in_channels < 1:
        raise ConfigError(f"export: image size {image_size} and {in_channels} channels; expected positive values")
    require_onnx()
    path = Path(path)
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    example = torch.rand(2, in_channels, image_size, image_size)
    with atomic_path(path) as tmp, torch.no_grad():
        try:
            _legacy(net, example, str(tmp), opset)
        except (TypeError, RuntimeError, NotImplementedError) as legacy_error:
            try:
                _dynamo(net, example, str(tmp), opset)
            except ImportError as e:
                raise ConfigError(f"export: the legacy ONNX exporter failed ({_first_line(legacy_error)}) and the "
                                  f"dynamo exporter needs onnxscript ({_first_line(e)}); pip install onnxscript") from None
            except Exception as e:
                raise RuntimeError(f"ONNX export failed: legacy exporter: {_first_line(legacy_error)}; "
                                   f"dynamo exporter: {_first_line(e)}") from e
        if metadata or doc:
            _add_metadata(str(tmp), metadata or {}, doc)
    return path
