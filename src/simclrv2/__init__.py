"""SimCLRv2: big self-supervised models are strong semi-supervised learners (Chen et al., 2020).

The command line and Python share names and defaults: every ``simclrv2 COMMAND --option`` is
``simclrv2.command(option=...)`` here (dashes become underscores)::

    import simclrv2

    simclrv2.pretrain(out="runs/pre", dataset="digits", depth=18, width=0.125, epochs=2)
    simclrv2.finetune(out="runs/ft", pretrained="runs/pre", dataset="digits", label_fraction=0.1)
    simclrv2.evaluate("runs/ft")["top1"]
    simclrv2.embed("runs/ft", ["photos/"], out="feats.npy")["features"]

Every function logs like the command line (INFO lines on stderr, a progress bar on a terminal)
unless the caller has configured the ``simclrv2`` logger: ``logging.getLogger("simclrv2").setLevel("WARNING")``
before a call keeps it quiet.

Stage functions take ``preset=`` (a shipped preset name, a YAML file or a dict) plus any option of
the stage's config (:mod:`simclrv2.config`); explicit options win over the preset. They (and
``pipeline``) also take ``view_transforms=[fn, ...]``: callables ``fn(views, generator) -> views``
added to the training views (:mod:`simclrv2.data.augment`; e.g. ``rotations_and_flips``). They are
not options: a run continued later must be given the same ones. Nothing heavy
(torch, the models) is imported until a function is called; submodules (``simclrv2.models``,
``simclrv2.data``, ...) import on first access.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__", "distill", "embed", "evaluate", "export", "finetune", "import_tf", "linear_eval", "load_encoder",
    "load_model",
    "pipeline", "predict", "pretrain", "supervised",
]

_SUBMODULES = {"checkpoint", "cli", "config", "data", "distributed", "engine", "errors", "export", "feature_map", "inference", "losses",
               "metrics", "models", "optim", "pipeline", "report", "rundir", "runtime", "stages", "tf_bundle",
               "tf_import"}


def _logs_like_cli(fn):
    """Set up the ``simclrv2`` logger as the CLI does (INFO; a progress bar on a terminal) unless the
    caller configured it (a level or a handler of its own)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any):
        import logging

        logger = logging.getLogger("simclrv2")
        if logger.level == logging.NOTSET and not logger.handlers:
            from simclrv2.runtime import setup_logging

            setup_logging(0)
        return fn(*args, **kwargs)
    return call


def _stage(stage: str, preset: str | dict | None, options: dict[str, Any]) -> dict[str, Any]:
    from simclrv2 import stages
    from simclrv2.config import load_preset, make_config
    from simclrv2.data.augment import view_transforms

    extra = options.pop("view_transforms", None) or ()
    values = preset if isinstance(preset, dict) else load_preset(preset)
    cfg = make_config(stage, values, **options)
    with view_transforms(extra):
        return getattr(stages, stage)(cfg)


@_logs_like_cli
def pretrain(preset: str | dict | None = None, **options: Any) -> dict[str, Any]:
    """Contrastive pretraining of encoder + projection head (``simclrv2 pretrain``). Returns the stage's result."""
    return _stage("pretrain", preset, options)


@_logs_like_cli
def finetune(preset: str | dict | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune a pretrained model from a head layer on the labeled subset (``simclrv2 finetune``; needs ``pretrained=``)."""
    return _stage("finetune", preset, options)


@_logs_like_cli
def distill(preset: str | dict | None = None, **options: Any) -> dict[str, Any]:
    """Distil a fine-tuned teacher into a student on all training images (``simclrv2 distill``; needs ``teacher=``)."""
    return _stage("distill", preset, options)


@_logs_like_cli
def supervised(preset: str | dict | None = None, **options: Any) -> dict[str, Any]:
    """The baseline: the same classifier trained from scratch on the labeled subset (``simclrv2 supervised``)."""
    return _stage("supervised", preset, options)


@_logs_like_cli
def linear_eval(preset: str | dict | None = None, **options: Any) -> dict[str, Any]:
    """Linear classifier on a frozen pretrained encoder (``simclrv2 linear-eval``; needs ``pretrained=``)."""
    return _stage("linear_eval", preset, options)


@_logs_like_cli
def evaluate(checkpoint: str, dataset: str | None = None, data_dir: str | None = None, **options: Any) -> dict[str, Any]:
    """Top-1 / top-5 (%) of a classifier checkpoint on a dataset split (``simclrv2 evaluate``); ``options``:
    split, device, precision, batch_size, workers (defaults: ``simclrv2.config.EVALUATE_DEFAULTS``)."""
    from simclrv2.stages import evaluate as _evaluate

    return _evaluate(checkpoint, dataset, data_dir, **options)


@_logs_like_cli
def pipeline(preset: str = "cpu-demo", out: str = "", dataset: str | None = None, data_dir: str | None = None,
             label_fractions: list[float] | None = None, overrides: dict[str, Any] | list[str] | None = None,
             device: str | None = None, unlabeled_dir: str | None = None, labeled_dir: str | None = None,
             test_dir: str | None = None, view_transforms=None) -> dict[str, Any]:
    """The whole recipe for each label fraction, with a report (``simclrv2 pipeline``).

    ``overrides``: ``{"pretrain": {"epochs": 5}, "seed": 1}`` or the CLI's ``["pretrain.epochs=5", "seed=1"]``.
    ``unlabeled_dir`` / ``labeled_dir`` / ``test_dir``: your own image folders (README "Your own images").
    ``view_transforms``: added to every stage's training views (see the module docstring).
    """
    from simclrv2.data.augment import view_transforms as _view_transforms
    from simclrv2.errors import ConfigError
    from simclrv2.pipeline import parse_overrides, run_pipeline

    if not out:
        raise ConfigError("pipeline: out= is required")
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(list(overrides))
    with _view_transforms(view_transforms or ()):
        return run_pipeline(preset, out, dataset=dataset, data_dir=data_dir, label_fractions=label_fractions,
                            overrides=overrides, device=device, unlabeled_dir=unlabeled_dir, labeled_dir=labeled_dir,
                            test_dir=test_dir)


@_logs_like_cli
def embed(checkpoint: str, images, out: str | None = None, head_layer: int | None = None, **options: Any) -> dict[str, Any]:
    """Features of image files/folders (``simclrv2 embed``); ``options``: batch_size, device, precision
    (defaults: ``simclrv2.config.INFERENCE_DEFAULTS``). See :func:`simclrv2.inference.embed`."""
    from simclrv2.inference import embed as _embed

    return _embed(checkpoint, images, out, head_layer, **options)


@_logs_like_cli
def predict(checkpoint: str, images, out: str | None = None, **options: Any) -> dict[str, Any]:
    """Class predictions of a classifier for image files/folders (``simclrv2 predict``); ``options``:
    batch_size, device, precision (defaults: ``simclrv2.config.INFERENCE_DEFAULTS``), top_k.
    See :func:`simclrv2.inference.predict`."""
    from simclrv2.inference import predict as _predict

    return _predict(checkpoint, images, out, **options)


@_logs_like_cli
def export(checkpoint: str, onnx: str) -> dict[str, Any]:
    """ONNX export of a classifier checkpoint (``simclrv2 export``)."""
    from simclrv2.inference import export as _export

    return _export(checkpoint, onnx)


@_logs_like_cli
def import_tf(checkpoint: str, out: str, **options: Any) -> dict[str, Any]:
    """Convert an official TF checkpoint to ``out/final.*`` (``simclrv2 import-tf``); ``options``: kind,
    head_layer, ema, image_size (default: ``simclrv2.config.IMPORT_TF_DEFAULTS``)."""
    from simclrv2.inference import import_tf as _import_tf

    return _import_tf(checkpoint, out, **options)


def load_model(checkpoint: str, kind: str | None = None):
    """(model, metadata) of a checkpoint file or stage directory; ``kind`` 'simclr' / 'classifier' is checked if given.

    The metadata is a :class:`simclrv2.checkpoint.CheckpointMeta` (``meta.model`` its
    :class:`simclrv2.models.ModelSpec`, ``meta.classes``, ``meta.image_size``, ``meta.result``, ...)."""
    from simclrv2.checkpoint import load_model as _load_model

    return _load_model(checkpoint, kind)


def load_encoder(checkpoint: str):
    """The ResNet encoder of a checkpoint as a plain ``torch.nn.Module`` (images in [0, 1] -> features);
    see :func:`simclrv2.checkpoint.load_encoder` for its torchvision-compatible weight names."""
    from simclrv2.checkpoint import load_encoder as _load_encoder

    return _load_encoder(checkpoint)


class _CommandAndModule:
    """An API function that shares its name with a submodule (``pipeline``, ``export``): calling it runs
    the command, its attributes are the submodule's (``simclrv2.pipeline.run_pipeline`` keeps working,
    and so does ``monkeypatch.setattr("simclrv2.pipeline.X", ...)``)."""

    def __init__(self, fn, module: str):
        object.__setattr__(self, "__wrapped__", fn)  # inspect.signature / help() show the function's
        object.__setattr__(self, "__doc__", fn.__doc__)
        object.__setattr__(self, "_module_name", module)

    def _module(self):
        return importlib.import_module(self._module_name)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._module(), name)

    def __dir__(self) -> list[str]:
        return dir(self._module())

    def __repr__(self) -> str:
        return f"<simclrv2 command {self.__wrapped__.__name__}() and module {self._module_name}>"


pipeline = _CommandAndModule(pipeline, "simclrv2.pipeline")
export = _CommandAndModule(export, "simclrv2.export")


class _Package(types.ModuleType):
    """Importing ``simclrv2.pipeline`` / ``simclrv2.export`` must not replace the commands of those names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and isinstance(self.__dict__.get(name), _CommandAndModule):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"simclrv2.{name}")
    raise AttributeError(f"module 'simclrv2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
