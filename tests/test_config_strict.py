"""A misspelt preset key or --set override is an error naming it and the nearest valid name
(it used to be silently ignored, training the defaults)."""

import pytest

from simclrv2.cli import main
from simclrv2.config import check_preset, load_preset, preset_names
from simclrv2.errors import ConfigError


def _error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("text,needle", [
    ("temprature: 3\n", "unknown key 'temprature'; did you mean 'temperature'?"),
    ("pretrian: {epochs: 3}\n", "unknown key 'pretrian'; did you mean 'pretrain'?"),
    ("pretrain: {temprature: 3}\n", "pretrain.temprature is not an option of pretrain; did you mean 'temperature'?"),
    ("distill_small: {epoch: 3}\n", "distill_small.epoch is not an option of distill; did you mean 'epochs'?"),
    ("model: {depth: 18, widht: 0.5}\n", "model takes depth, width, sk; got ['widht']"),
    ("fractions: {0.1: {finetun: {epochs: 2}}}\n", "fractions.0.1.finetun is not a stage section; did you mean 'finetune'?"),
    ("pretrain: 5\n", "section 'pretrain' must be a mapping of options"),
])
def test_misspelt_preset_keys_are_named(tmp_path, capsys, text, needle):
    preset = tmp_path / "mine.yaml"
    preset.write_text("dataset: digits\n" + text)
    line = _error(capsys, "pretrain", "--preset", str(preset), "--out", str(tmp_path / "o"))
    assert line.startswith("simclrv2: error: --preset ") and needle in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override,needle", [
    ("pretrian.epochs=500", "--set: unknown key 'pretrian'; did you mean 'pretrain'?"),
    ("pretrain.epoch=5", "--set: pretrain.epoch is not an option of pretrain; did you mean 'epochs'?"),
    ("sed=1", "--set: unknown key 'sed'; did you mean 'seed'?"),
])
def test_misspelt_pipeline_overrides_are_named(tmp_path, capsys, override, needle):
    line = _error(capsys, "pipeline", "--preset", "tiny", "--out", str(tmp_path / "o"), "--set", override)
    assert needle in line, line
    assert not list((tmp_path / "o").glob("**/*.safetensors"))


def test_shipped_presets_and_valid_keys_pass():
    for name in preset_names():
        check_preset(load_preset(name), name)  # raises on any unknown key
    check_preset({"seed": 1, "workers": 0, "pretrain": {"knn_k": 20}, "distill_small": {"epochs": 2},
                  "fractions": {0.1: {"finetune": {"epochs": 2}}}, "model": {"depth": 18}}, "test")
    with pytest.raises(ConfigError, match="'knn_kk'.*did you mean 'knn_k'"):
        check_preset({"knn_kk": 20}, "test")


def test_presets_command_lists_each_preset_with_its_purpose(capsys):
    from simclrv2.cli import main

    assert main(["presets"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert set(lines) == {"cpu-demo", "cpu-full", "gpu-224", "imagenet", "tiny"}
    assert "tests and smoke checks only" in lines["tiny"] and "2 hours" in lines["cpu-full"]
    assert all(text.strip().endswith(".") for text in lines.values())  # a whole sentence, not a cut-off line


@pytest.mark.parametrize("preset_name", ["cpu-demo", "cpu-full", "tiny"])
def test_a_stage_run_alone_with_a_preset_does_what_the_pipeline_does(preset_name, tmp_path):
    """Head layer, student initialisation, per-fraction epochs and batch sizes: the pipeline's config of
    each stage equals the stage's own config from ``--preset P`` with the same inputs."""
    from dataclasses import asdict

    from simclrv2.config import load_preset, make_config
    from simclrv2.pipeline import plan

    preset = load_preset(preset_name)
    fractions = preset["label_fractions"]
    graph = plan(preset, fractions, tmp_path)
    checked = set()
    # variants only the pipeline builds: its second head layer, the small students (except the first when
    # there is no self-distillation: then `distill --preset P` is the big-to-small step into it)
    alone_builds = "distill_small" if preset.get("self_distill") is False else None
    for node in graph:
        if node.out.name.startswith(("distill_small", "finetune_head")) and node.out.name != alone_builds:
            continue
        inputs = {k: getattr(node.config, k) for k in ("pretrained", "teacher") if getattr(node.config, k, None)}
        alone = make_config(node.stage, preset, out=node.config.out, label_fraction=node.config.label_fraction, **inputs)
        assert asdict(alone) == asdict(node.config), (node.stage, node.out)
        checked.add(node.stage)
    assert checked == {"pretrain", "supervised", "linear_eval", "finetune", "distill"}
    if preset_name == "cpu-demo":  # student = teacher
        assert make_config("distill", preset, out="x", teacher="t", label_fraction=0.01).init_from == "t"
    if preset_name == "cpu-full":  # per-fraction section, head layer 0, the students and the baseline's size
        ft = make_config("finetune", preset, out="x", pretrained="p", label_fraction=0.1)
        assert ft.head_layer == 0 and ft.epochs == 40 and ft.batch_size == 128
        d = make_config("distill", preset, out="x", teacher="t", label_fraction=0.01)
        assert (d.width, d.init_from, d.epochs, d.weight_decay) == (0.25, None, 15, 1e-4)
        assert make_config("supervised", preset, out="x", label_fraction=0.01).width == 0.25
        assert make_config("pretrain", preset, out="x").width == 0.5
        names = [n.out.name for n in graph if n.fraction == 0.01]
        assert names == ["supervised", "linear_eval", "finetune", "distill_small", "distill_small2"]
        small = [n.config for n in graph if n.out.name.startswith("distill_small")]
        assert [c.width for c in small[:2]] == [0.25, 0.125] and all(c.teacher.endswith("finetune") for c in small)


def test_defaults_of_the_commands_that_use_models_live_in_one_place():
    """The CLI's defaults and the functions' defaults are config's EVALUATE/INFERENCE/IMPORT_TF_DEFAULTS."""
    import inspect

    from simclrv2 import inference
    from simclrv2.cli import build_parser
    from simclrv2.config import EVALUATE_DEFAULTS, IMPORT_TF_DEFAULTS, INFERENCE_DEFAULTS
    from simclrv2.stages import evaluate

    parser = build_parser()
    cases = [("evaluate", evaluate, EVALUATE_DEFAULTS, ["x"]), ("embed", inference.embed, INFERENCE_DEFAULTS, ["x", "y", "--out", "z"]),
             ("predict", inference.predict, INFERENCE_DEFAULTS, ["x", "y", "--out", "z"]),
             ("import-tf", inference.import_tf, IMPORT_TF_DEFAULTS, ["x", "--out", "z"])]
    for command, fn, defaults, args in cases:
        parsed = vars(parser.parse_args([command, *args]))
        params = inspect.signature(fn).parameters
        for name, value in defaults.items():
            assert parsed[name] == value and params[name].default == value, (command, name)
