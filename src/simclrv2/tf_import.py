"""Import the official SimCLRv2 TensorFlow checkpoints (google-research/simclr) into our models.

Three parts, none of which needs TensorFlow:

1. :class:`simclrv2.tf_bundle.TFCheckpoint`, a pure-Python (numpy) reader of TF's checkpoint format
   ("tensor bundle"), in its own module.
2. :func:`convert`, which maps the official variable names onto our ``SimCLRModel`` / ``Classifier``
   state dicts, inferring the architecture (depth, width, SK, head depth, classes) from the names and
   shapes. Two naming layouts are understood:

   * **TF1** (``run.py``/``resnet.py``/``model_util.py`` at the repository root; the released
     ``gs://simclr-checkpoints/simclrv2/{pretrained,finetuned_*pct,supervised,...}/rXX_Yx_skZ/model.ckpt-N``
     checkpoints, the ones converted by Separius/SimCLRv2-Pytorch ``convert.py``): encoder variables are
     named by creation order inside the ``base_model`` scope, ``base_model/conv2d[_N]/kernel`` and
     ``base_model/batch_normalization[_N]/{gamma,beta,moving_mean,moving_variance}``; the projection head is
     ``head_contrastive/nl_J/dense/kernel`` + ``head_contrastive/nl_J/batch_normalization/*`` (the last
     layer's BN has no ``beta``); the classifier is ``head_supervised/linear_layer/dense/{kernel,bias}``.
     EMA copies live under ``ema_model/``; optimizer slots end in ``/Momentum`` (LARS and momentum).
   * **TF2** object-based checkpoints written by ``tf2/run.py`` (``tf.train.Checkpoint(model=...)``) and
     SavedModel ``variables/variables``: keys are attribute paths ending in ``/.ATTRIBUTES/VARIABLE_VALUE``,
     ``.../resnet_model/initial_conv_relu_max_pool/I/{conv2d/kernel,bn/*}``,
     ``.../resnet_model/block_groups/G/layers/B/{projection_layers,conv_relu_dropblock_layers}/I/...``
     (SK: ``conv2d_fixed_padding/conv2d``, ``batch_norm_relu/bn``, ``conv2d_0``, ``batch_norm_relu_1/bn``,
     ``conv2d_1``), ``.../_projection_head/linear_layers/J/{dense/kernel,bn_relu/bn/*}`` and
     ``.../supervised_head/linear_layer/dense/{kernel,bias}`` (from the attribute names in tf2/resnet.py
     and tf2/model.py).

   Layouts: conv kernels HWIO -> OIHW, dense kernels [in, out] -> [out, in]; BN gamma/beta/moving_mean/
   moving_variance -> weight/bias/running_mean/running_var. Optimizer slots, ``global_step``,
   ``save_counter`` and the object graph are ignored.
3. :func:`import_tf`, which writes our checkpoint pair ``OUT/final.safetensors`` + ``OUT/final.json``
   (:func:`simclrv2.checkpoint.save_checkpoint`, the writer of every checkpoint).

Kinds and the fine-tuning layer. A checkpoint with a projection head and no hint in its path becomes a
``"simclr"`` model (encoder + full head; the linear-eval head of a pretrained checkpoint, trained on the
encoder output, becomes the online probe when our SimCLRModel has one). Paths of the official release
name their kind: ``pretrained`` -> simclr; ``finetuned_1pct``/``finetuned_10pct`` -> classifier from head
layer 1 (the official ``--ft_proj_selector=1``); ``finetuned_100pct``, ``supervised``, ``distill_*`` ->
classifier from layer 0 (the paper fine-tunes from the head's input with 100% labels; students have no
head). TF checkpoints do not record ``ft_proj_selector``: pass ``head_layer`` to override. A classifier
keeps the head truncated to ``head_layer`` (exactly what its logits use); the JSON records the full head
depth (``head_layers``) and ``head_layer``; the dropped head layers are listed in the metadata (``imported``), and
importing the same checkpoint with ``kind="simclr"`` keeps the full head.

Numerics. The weights map one to one and models/resnet.py pads as TF does (the stem's 3x3/2 'SAME'
max-pool, the ResNet-D shortcut pools of SK models, fixed-padding convs; see its docstring), so an
imported model computes the TF network's function. Images are in [0, 1], as in TF.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2.errors import CheckpointError, ConfigError, UserError
from simclrv2.models import ModelSpec, build_model
from simclrv2.models.resnet import STAGES, SelectiveKernel, scaled, sk_options
from simclrv2.tf_bundle import TFCheckpoint, crc32c, resolve_prefix

__all__ = ["TFCheckpoint", "convert", "crc32c", "import_tf", "resolve_prefix"]


# ----------------------------------------------------------------------------------------------
# Official variable names -> canonical structure
# ----------------------------------------------------------------------------------------------

BN_ATTRS = ("gamma", "beta", "moving_mean", "moving_variance")
BN_TO_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}

_SLOT_LEAVES = {"Momentum", "Adam", "Adam_1", "RMSProp", "RMSProp_1", "ExponentialMovingAverage", "Momentum_1"}
_IGNORED_NAMES = {"global_step", "beta1_power", "beta2_power", "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _is_bookkeeping(name: str) -> bool:
    """Optimizer slots, step counters and the object graph: never part of the model."""
    if name in _IGNORED_NAMES or "LARSOptimizer" in name or ".OPTIMIZER_SLOT" in name:
        return True
    if name.startswith(("optimizer/", "save_counter/", "global_step/")):
        return True
    return name.rsplit("/", 1)[-1] in _SLOT_LEAVES


@dataclass
class _Layout:
    """The checkpoint's variables in our canonical order (TF creation order)."""

    kind: str  # "tf1" | "tf2"
    convs: list[str] = field(default_factory=list)  # kernel names, creation order
    bns: list[dict[str, str]] = field(default_factory=list)  # attr -> name, creation order
    head: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (dense kernel, bn attrs) per layer
    sup: tuple[str, str | None] | None = None  # (kernel, bias)
    groups: dict[int, int] | None = None  # TF2 only: blocks per group
    used_scope: set[str] = field(default_factory=set)  # names consumed by this layout


def _ordered_bns(found: dict[Any, dict[str, str]], where: Path) -> list[dict[str, str]]:
    out = []
    for key in sorted(found):
        attrs = found[key]
        missing = [a for a in ("gamma", "moving_mean", "moving_variance") if a not in attrs]
        if missing:
            raise CheckpointError(f"{where}: batch norm {key} lacks {missing[0]}; expected gamma, beta, moving_mean, moving_variance")
        out.append(attrs)
    return out


def _layout_tf1(names: list[str], ema: bool, where: Path) -> _Layout:
    pre = "ema_model/" if ema else ""
    conv_re = re.compile(rf"^{pre}base_model/conv2d(?:_(\d+))?/kernel$")
    bn_re = re.compile(rf"^{pre}base_model/batch_normalization(?:_(\d+))?/(gamma|beta|moving_mean|moving_variance)$")
    head_re = re.compile(rf"^{pre}head_contrastive/(nl|l)_(\d+)/(dense/kernel|batch_normalization/(gamma|beta|moving_mean|moving_variance))$")
    sup_re = re.compile(r"^head_supervised/linear_layer/dense/(kernel|bias)$")
    lay = _Layout("tf1")
    convs: dict[int, str] = {}
    bns: dict[int, dict[str, str]] = {}
    head: dict[int, dict[str, str]] = {}
    sup: dict[str, str] = {}
    for n in names:
        if _is_bookkeeping(n):
            continue
        if m := conv_re.match(n):
            convs[int(m.group(1) or 0)] = n
        elif m := bn_re.match(n):
            bns.setdefault(int(m.group(1) or 0), {})[m.group(2)] = n
        elif m := head_re.match(n):
            slot = head.setdefault(int(m.group(2)), {})
            slot["kernel" if m.group(3) == "dense/kernel" else m.group(4)] = n
        elif m := sup_re.match(n):
            sup[m.group(1)] = n
        elif n.startswith(f"{pre}base_model/") or n.startswith(f"{pre}head_contrastive/"):
            raise CheckpointError(f"{where}: unsupported variable {n}; expected only conv2d/batch_normalization "
                                  "variables in base_model/ and nl_J dense + batch_normalization in head_contrastive/")
        else:
            continue
        lay.used_scope.add(n)
    lay.convs = [convs[i] for i in sorted(convs)]
    lay.bns = _ordered_bns(bns, where)
    lay.head = _ordered_head(head, where)
    lay.sup = (sup["kernel"], sup.get("bias")) if "kernel" in sup else None
    return lay


def _ordered_head(head: dict[int, dict[str, str]], where: Path) -> list[tuple[str, dict[str, str]]]:
    if sorted(head) != list(range(len(head))):
        raise CheckpointError(f"{where}: projection head layers {sorted(head)}; expected consecutive layers from 0")
    out = []
    for j in range(len(head)):
        slot = dict(head[j])
        if "kernel" not in slot:
            raise CheckpointError(f"{where}: projection head layer {j} has no dense kernel")
        kernel = slot.pop("kernel")
        out.append((kernel, _ordered_bns({j: slot}, where)[0]))
    return out


_SK_SUB = {"conv2d_fixed_padding/conv2d": 0, "batch_norm_relu/bn": 1, "conv2d_0": 2, "batch_norm_relu_1/bn": 3, "conv2d_1": 4}


def _layout_tf2(names: list[str], where: Path) -> _Layout:
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    attrs = "(gamma|beta|moving_mean|moving_variance)"
    stem_re = re.compile(rf"^(.*)resnet_model/initial_conv_relu_max_pool/(\d+)/(conv2d/kernel|bn/{attrs})$")
    block_re = re.compile(r"^(.*)resnet_model/block_groups/(\d+)/layers/(\d+)/(projection_layers|conv_relu_dropblock_layers)/(\d+)/(.+)$")
    sub_re = re.compile(rf"^(?:(conv2d_fixed_padding/conv2d|conv2d_0|conv2d_1|conv2d)/kernel|(batch_norm_relu/bn|batch_norm_relu_1/bn|bn)/{attrs})$")
    head_re = re.compile(rf"^(.*)_projection_head/linear_layers/(\d+)/(dense/kernel|bn_relu/bn/{attrs})$")
    sup_re = re.compile(r"^(.*)supervised_head/linear_layer/dense/(kernel|bias)$")
    lay = _Layout("tf2")
    convs: dict[tuple, str] = {}
    bns: dict[tuple, dict[str, str]] = {}
    head: dict[int, dict[str, str]] = {}
    sup: dict[str, str] = {}
    roots: set[str] = set()
    groups: dict[int, set[int]] = {}
    for full in names:
        if not full.endswith(suffix) or _is_bookkeeping(full):
            continue
        n = full[: -len(suffix)]
        if m := stem_re.match(n):
            roots.add(m.group(1))
            key = (0, 0, 0, 0, int(m.group(2)), 0)
            if m.group(3) == "conv2d/kernel":
                convs[key] = full
            else:
                bns.setdefault(key, {})[m.group(4)] = full
        elif m := block_re.match(n):
            roots.add(m.group(1))
            g, b = int(m.group(2)), int(m.group(3))
            groups.setdefault(g, set()).add(b)
            sm = sub_re.match(m.group(6))
            if not sm:
                raise CheckpointError(f"{where}: unsupported variable {full}; expected conv2d kernels and bn variables "
                                      "(SE layers and other variants are not supported)")
            sub = _SK_SUB.get(sm.group(1) or sm.group(2), 0)
            key = (1, g, b, 0 if m.group(4) == "projection_layers" else 1, int(m.group(5)), sub)
            if sm.group(1):
                convs[key] = full
            else:
                bns.setdefault(key, {})[sm.group(3)] = full
        elif m := head_re.match(n):
            roots.add(m.group(1))
            slot = head.setdefault(int(m.group(2)), {})
            slot["kernel" if m.group(3) == "dense/kernel" else m.group(4)] = full
        elif m := sup_re.match(n):
            roots.add(m.group(1))
            sup[m.group(2)] = full
        elif "resnet_model/" in n or "_projection_head/" in n:
            raise CheckpointError(f"{where}: unsupported variable {full}; expected the tf2/resnet.py + tf2/model.py layers")
        else:
            continue
        lay.used_scope.add(full)
    if len(roots) > 1:
        raise CheckpointError(f"{where}: model variables under several roots {sorted(roots)}; expected one model")
    lay.convs = [convs[k] for k in sorted(convs)]
    lay.bns = _ordered_bns(bns, where)
    lay.head = _ordered_head(head, where)
    lay.sup = (sup["kernel"], sup.get("bias")) if "kernel" in sup else None
    lay.groups = {g: len(bs) for g, bs in groups.items()}
    return lay


def _encoder_order(encoder: nn.Module) -> tuple[list[str], list[str]]:
    """Our conv and BN module names in the order TF creates them (stem; per block: projection
    shortcut conv+BN, conv1, BN1, SK conv/BN/fc1/fc_bn/fc2 or conv2+BN2, conv3, BN3)."""
    convs: list[str] = []
    bns: list[str] = []
    if encoder.conv1 is not None:
        convs.append("conv1")
    else:
        for i, m in enumerate(encoder.stem):
            if isinstance(m, nn.Conv2d):
                convs.append(f"stem.{i}")
            elif isinstance(m, nn.BatchNorm2d):
                bns.append(f"stem.{i}")
    bns.append("bn1")
    for li in range(1, 5):
        for bi, blk in enumerate(getattr(encoder, f"layer{li}")):
            p = f"layer{li}.{bi}"
            if blk.downsample is not None:
                for i, m in enumerate(blk.downsample):
                    if isinstance(m, nn.Conv2d):
                        convs.append(f"{p}.downsample.{i}")
                    elif isinstance(m, nn.BatchNorm2d):
                        bns.append(f"{p}.downsample.{i}")
            convs.append(f"{p}.conv1")
            bns.append(f"{p}.bn1")
            if isinstance(blk.conv2, SelectiveKernel):
                convs += [f"{p}.conv2.conv", f"{p}.conv2.fc1", f"{p}.conv2.fc2"]
                bns += [f"{p}.conv2.bn", f"{p}.conv2.fc_bn"]
            else:
                convs.append(f"{p}.conv2")
                bns.append(f"{p}.bn2")
            if hasattr(blk, "conv3"):
                convs.append(f"{p}.conv3")
                bns.append(f"{p}.bn3")
    return convs, bns


def _infer_encoder(ck: TFCheckpoint, lay: _Layout) -> dict[str, Any]:
    where = ck.index_path
    n_conv, n_bn = len(lay.convs), len(lay.bns)
    if n_conv == 0:
        raise CheckpointError(f"{where}: no encoder variables (base_model/conv2d*/kernel or resnet_model/...); "
                              "expected a SimCLR / SimCLRv2 checkpoint")
    matches = []
    for depth, (kind, blocks) in STAGES.items():
        if kind != "bottleneck":
            continue
        nb = sum(blocks)
        for sk in (False, True):
            for stem in ((1, 3) if sk else (1,)):
                if (n_conv, n_bn) == (stem + (5 if sk else 3) * nb + 4, stem + (4 if sk else 3) * nb + 4):
                    matches.append((depth, sk, stem))
    if len(matches) != 1:
        raise CheckpointError(f"{where}: {n_conv} conv kernels and {n_bn} batch norms do not match a ResNet-50/101/152 "
                              "with or without selective kernels (ResNet-18/34 checkpoints are not supported)")
    depth, sk, stem = matches[0]
    if lay.groups is not None and [lay.groups.get(g, 0) for g in range(4)] != STAGES[depth][1]:
        raise CheckpointError(f"{where}: blocks per group {[lay.groups.get(g, 0) for g in range(4)]} do not match ResNet-{depth}")
    first = ck.shape(lay.convs[0])
    if len(first) != 4:
        raise CheckpointError(f"{where}: {lay.convs[0]} has shape {list(first)}; expected a 4-D HWIO conv kernel")
    small = stem == 1 and first[0] == 3  # CIFAR stem: one 3x3 stride-1 conv (TF cifar_stem, image_size <= 32)
    proj = ck.shape(lay.convs[stem])  # first block's projection shortcut: [1, 1, 64w, 256w]
    width = proj[-1] / 256
    width = int(width) if float(width).is_integer() else width
    # SimCLRv2's SK ResNets have the ResNet-D stem and shortcuts too (small images: the one-conv stem)
    return dict(depth=depth, width_multiplier=width, in_channels=3, **sk_options(sk, small))


def _bn_state(ck: TFCheckpoint, attrs: dict[str, str], prefix: str, used: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for a in BN_ATTRS:
        if a in attrs:
            out[f"{prefix}.{BN_TO_TORCH[a]}"] = _tensor(ck, attrs[a], "vector", used)
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def _tensor(ck: TFCheckpoint, name: str, how: str, used: set[str]) -> torch.Tensor:
    arr = ck.read(name)
    if how == "conv":
        if arr.ndim != 4:
            raise CheckpointError(f"{ck.index_path}: {name} has shape {list(arr.shape)}; expected a 4-D HWIO conv kernel")
        arr = arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif how == "dense":
        if arr.ndim != 2:
            raise CheckpointError(f"{ck.index_path}: {name} has shape {list(arr.shape)}; expected a 2-D dense kernel [in, out]")
        arr = arr.T  # [in, out] -> [out, in]
    elif arr.ndim != 1:
        raise CheckpointError(f"{ck.index_path}: {name} has shape {list(arr.shape)}; expected a vector")
    used.add(name)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


_HINTS = (
    (re.compile(r"^finetuned_(1|10)pct$"), "classifier", 1),
    (re.compile(r"^finetuned_100pct$"), "classifier", 0),
    (re.compile(r"^(supervised|distill.*)$"), "classifier", 0),
    (re.compile(r"^pretrained$"), "simclr", 0),
)


def _path_hint(prefix: Path) -> tuple[str, str, int] | None:
    for part in reversed(Path(os.path.abspath(prefix)).parts):
        for pattern, kind, layer in _HINTS:
            if pattern.match(part.lower()):
                return part, kind, layer
    return None


def _convert(path: str | os.PathLike, kind: str | None = None, head_layer: int | None = None,
             ema: bool = False) -> tuple[dict[str, torch.Tensor], ModelSpec, dict[str, Any]]:
    """(state dict, model spec, how it was read) of a TF checkpoint; see :func:`convert`."""
    ck = TFCheckpoint(path)
    where = ck.index_path
    names = ck.keys()
    is_tf2 = any(n.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for n in names)
    if ema and is_tf2:
        raise CheckpointError(f"{where}: --ema applies to TF1 checkpoints (ema_model/ variables); this is a TF2 object-based checkpoint")
    if ema and not any(n.startswith("ema_model/base_model/") for n in names):
        raise CheckpointError(f"{where}: no ema_model/base_model/ variables; expected an EMA copy when importing with ema=True")
    lay = _layout_tf2(names, where) if is_tf2 else _layout_tf1(names, ema, where)
    arch = _infer_encoder(ck, lay)
    feat = scaled(512, arch["width_multiplier"]) * 4  # the encoder's output width, 2048w

    head_layers = len(lay.head)
    proj_dim = ck.shape(lay.head[-1][0])[-1] if head_layers else 128
    num_classes = sup_in = None
    if lay.sup is not None:
        kshape = ck.shape(lay.sup[0])
        if len(kshape) != 2:
            raise CheckpointError(f"{where}: {lay.sup[0]} has shape {list(kshape)}; expected a dense kernel [in, classes]")
        sup_in, num_classes = kshape

    kind, why = _kind(kind, lay, head_layers, _path_hint(ck.prefix))
    if kind == "classifier" and lay.sup is None:
        raise CheckpointError(f"{where}: no head_supervised/linear_layer/dense/kernel; a classifier needs the supervised head")
    info: dict[str, Any] = {"layout": lay.kind, "ema": ema, "kind_source": why}
    if kind == "classifier":
        head_layer, info["head_layer_source"] = _head_layer(head_layer, head_layers, sup_in, proj_dim, feat,
                                                            _path_hint(ck.prefix), where)
    elif head_layer is not None:
        raise ConfigError("head_layer applies to kind='classifier' only (the checkpoint imports as a 'simclr' model)")
    # a pretrained checkpoint's linear-eval head, trained on the encoder output, becomes the online probe
    probe = kind == "simclr" and lay.sup is not None and sup_in == feat

    spec = ModelSpec(kind, arch["depth"], arch["width_multiplier"], 3, arch["selective_kernel"], arch["stem_type"],
                     arch["avg_down"], head_layers=head_layers, proj_dim=int(proj_dim),
                     num_classes=int(num_classes) if (kind == "classifier" or probe) else None,
                     head_layer=head_layer if kind == "classifier" else 0)
    used: set[str] = set()
    sd = _state_dict(ck, lay, spec, used)

    ignored = [n for n in names if _is_bookkeeping(n)]
    unused = sorted(n for n in names if n not in used and not _is_bookkeeping(n))
    step = None
    for n in ("global_step", "global_step/.ATTRIBUTES/VARIABLE_VALUE"):
        if n in ck and ck.entries[n].dtype in (3, 9) and not ck.shape(n):
            step = int(ck.read(n))
    info.update(source=str(Path(os.path.abspath(ck.prefix))), global_step=step, tensors_used=len(used),
                bookkeeping_ignored=len(ignored), unused_count=len(unused), unused_variables=unused[:50])
    return sd, spec, info


def _state_dict(ck: TFCheckpoint, lay: _Layout, spec: ModelSpec, used: set[str]) -> dict[str, torch.Tensor]:
    """The state dict of ``spec``'s model from the checkpoint's variables (their names added to
    ``used``), checked against the model's names and shapes."""
    where = ck.index_path
    with torch.device("meta"):  # names and shapes only: no memory for (possibly huge) weights
        model = build_model(spec)
    sd: dict[str, torch.Tensor] = {}
    conv_names, bn_names = _encoder_order(model.encoder)
    if len(conv_names) != len(lay.convs) or len(bn_names) != len(lay.bns):
        raise CheckpointError(f"{where}: {len(lay.convs)} conv kernels and {len(lay.bns)} batch norms; the inferred "
                              f"ResNet-{spec.depth} has {len(conv_names)} and {len(bn_names)}")
    for tf_name, ours in zip(lay.convs, conv_names):
        sd[f"encoder.{ours}.weight"] = _tensor(ck, tf_name, "conv", used)
    for attrs, ours in zip(lay.bns, bn_names):
        sd.update(_bn_state(ck, attrs, f"encoder.{ours}", used))
    keep = spec.head_layers if spec.kind == "simclr" else spec.head_layer
    for j, (kernel, attrs) in enumerate(lay.head[:keep]):
        sd[f"head.layers.{j}.linear.weight"] = _tensor(ck, kernel, "dense", used)
        sd.update(_bn_state(ck, attrs, f"head.layers.{j}.bn", used))
    if lay.sup is not None and spec.num_classes is not None:  # the classifier, or the simclr model's probe
        dst = "fc" if spec.kind == "classifier" else "probe"
        sd[f"{dst}.weight"] = _tensor(ck, lay.sup[0], "dense", used)
        if lay.sup[1] is None:
            raise CheckpointError(f"{where}: {lay.sup[0]} has no bias; expected head_supervised/linear_layer/dense/bias")
        sd[f"{dst}.bias"] = _tensor(ck, lay.sup[1], "vector", used)
    mismatch = ckpt.state_mismatch(model.state_dict(), sd)
    if mismatch:
        raise CheckpointError(f"{where}: does not convert to ResNet-{spec.depth} width {spec.width} "
                              f"sk={spec.selective_kernel} with a {spec.head_layers}-layer head: {mismatch}")
    return sd


def _kind(kind: str | None, lay: _Layout, head_layers: int, hint) -> tuple[str, str]:
    """(kind, why) of the imported model: given, or from the heads present and the path's hint."""
    if kind is not None:
        if kind not in ("simclr", "classifier"):
            raise ConfigError(f"kind {kind!r} is not supported; expected 'simclr' or 'classifier'")
        return kind, "given"
    if lay.sup is None:
        return "simclr", "no supervised head in the checkpoint"
    if not head_layers:
        return "classifier", "supervised head and no projection head"
    if hint is not None:
        return hint[1], f"path component {hint[0]!r}"
    return "simclr", "projection head present and no kind hint in the path"


def _head_layer(head_layer: int | None, head_layers: int, sup_in: int, proj_dim: int, feat: int, hint,
                where: Path) -> tuple[int, str]:
    """(head layer, why) of an imported classifier: given, or inferred from the classifier's input."""
    if head_layer is not None:
        src = "given"
    elif sup_in == proj_dim and proj_dim != feat and head_layers:
        head_layer, src = head_layers, "inferred: the classifier's input is the projection"
    elif not head_layers:
        head_layer, src = 0, "no projection head in the checkpoint"
    elif hint is not None:
        head_layer, src = hint[2], f"default for {hint[0]!r} (TF checkpoints do not store ft_proj_selector)"
    else:
        head_layer, src = 1, "default 1, the SimCLRv2 fine-tuning layer (TF checkpoints do not store ft_proj_selector)"
    if not 0 <= head_layer <= head_layers:
        raise ConfigError(f"head_layer {head_layer} is not available; the checkpoint's head has {head_layers} layers (0 to {head_layers})")
    want = proj_dim if head_layer == head_layers and head_layers else feat
    if sup_in != want:
        raise CheckpointError(f"{where}: the supervised head takes {sup_in} inputs but head layer {head_layer} has {want}; "
                              "pass the head_layer the checkpoint was fine-tuned from")
    return head_layer, src


def convert(ckpt_prefix: str | os.PathLike, kind: str | None = None, head_layer: int | None = None,
            ema: bool = False) -> tuple[dict[str, torch.Tensor], ModelSpec]:
    """(state dict of a SimCLRModel or Classifier, its :class:`ModelSpec`) from an official TF checkpoint.

    The spec's ``num_classes`` is None without a supervised head in the result; its
    ``image_size`` is unset (TF checkpoints do not record it). ``kind`` None picks it as described
    in the module docstring; ``ema`` (TF1) imports the ``ema_model/`` copy.
    """
    sd, spec, _ = _convert(ckpt_prefix, kind, head_layer, ema)
    return sd, spec


# ----------------------------------------------------------------------------------------------
# Our checkpoint format
# ----------------------------------------------------------------------------------------------


def import_tf(ckpt_prefix: str | os.PathLike, out_dir: str | os.PathLike, kind: str | None = None,
              head_layer: int | None = None, ema: bool = False, image_size: int = 224) -> ckpt.CheckpointMeta:
    """Convert a TF checkpoint and write ``out_dir/final.safetensors`` + ``out_dir/final.json``.

    Tensors are stored as ``model.<state-dict key>`` (the layout the stages load); the metadata
    has stage ``"import-tf"``, the model spec and, under ``imported``, where the weights came from
    and how they were read. Returns the metadata.
    """
    sd, spec, info = _convert(ckpt_prefix, kind, head_layer, ema)
    size = 32 if spec.small_images and image_size == 224 else image_size
    meta = ckpt.CheckpointMeta("import-tf", spec.replace(image_size=size), complete=True, result={"tensors": len(sd)},
                               imported=info)
    ckpt.save_checkpoint(Path(out_dir) / "final", {f"model.{k}": v.contiguous() for k, v in sd.items()}, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simclrv2.tf_import", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="TF checkpoint prefix (DIR/model.ckpt-N), its .index file, or its directory")
    ap.add_argument("out_dir", help="output directory for final.safetensors + final.json")
    ap.add_argument("--kind", choices=["simclr", "classifier"], default=None)
    ap.add_argument("--head-layer", type=int, default=None)
    ap.add_argument("--ema", action="store_true", help="import the ema_model/ copy (TF1)")
    ap.add_argument("--list", action="store_true", help="only list the checkpoint's variables")
    args = ap.parse_args(argv)
    try:
        if args.list:
            ck = TFCheckpoint(args.checkpoint)
            for name, e in ck.entries.items():
                print(f"{name}\t{list(e.shape)}\tdtype={e.dtype}")
            return 0
        spec = import_tf(args.checkpoint, args.out_dir, args.kind, args.head_layer, args.ema).model
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {spec.kind}: ResNet-{spec.depth} width {spec.width} sk={spec.selective_kernel} "
          f"head_layers={spec.head_layers} num_classes={spec.num_classes} "
          f"head_layer={spec.head_layer if spec.kind == 'classifier' else None} -> {Path(args.out_dir) / 'final.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
