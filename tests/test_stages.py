"""Every stage on tiny data (digits, tiny widths), checking real effects."""

import json
import logging

import numpy as np
import pytest
import torch

from conftest import TINY
from simclrv2 import checkpoint as ckpt
from simclrv2.config import make_config
from simclrv2.data import load_dataset
from simclrv2.data.augment import EvalTransform
from simclrv2.engine import knn_accuracy, predict
from simclrv2.errors import CheckpointError, ConfigError
from simclrv2.models import build_model
from simclrv2.runtime import init_runtime
from simclrv2.checkpoint import load_model
from simclrv2.stages import distill, evaluate, finetune, linear_eval, pretrain, supervised


def _knn_of(encoder):
    rt = init_runtime("cpu", "fp32")
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    t = EvalTransform(tr.image_size)
    ftr, ytr = predict(encoder, tr, rt, t)
    fte, yte = predict(encoder, te, rt, t)
    return knn_accuracy(ftr, ytr, fte, yte, k=20, num_classes=10)


def test_pretraining_lowers_loss_and_beats_random_encoder(tiny_pretrained):
    out, result = tiny_pretrained
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["contrastive"] < rows[0]["contrastive"] - 0.1
    model, meta = load_model(out, "simclr")
    assert meta.stage == "pretrain" and meta.complete
    random_model = build_model(meta.model)
    assert _knn_of(model.encoder) > _knn_of(random_model.encoder) + 3.0
    assert any("knn" in r for r in rows) and result["knn"] > 50


def test_finetuned_model_has_expected_layers_and_beats_chance(tiny_pretrained, tiny_finetuned):
    out, result = tiny_finetuned
    tensors, meta = ckpt.load_checkpoint(out)
    assert meta.model.head_layer == 1  # default with <= 10% labels
    heads = sorted({k.split(".")[3] for k in tensors if k.startswith("model.head.layers.")})
    assert heads == ["0"]
    assert "model.fc.weight" in tensors and tensors["model.fc.weight"].shape[0] == 10
    assert result["top1"] > 40  # chance is 10%
    assert result["labeled_images"] == 144
    # the labeled subset written beside the run is the class-balanced 10%
    ids = (out / "labeled_subset.txt").read_text().split()
    assert len(ids) == 144


@pytest.mark.parametrize("k", [0, 2])
def test_finetune_from_other_head_layers(tiny_pretrained, tmp_path, k):
    cfg = make_config("finetune", out=str(tmp_path), pretrained=str(tiny_pretrained[0]), epochs=1, batch_size=48,
                      head_layer=k, **TINY)
    finetune(cfg)
    model, meta = load_model(tmp_path, "classifier")
    assert len(model.head.layers) == k and meta.model.head_layer == k


def _kl_and_agreement(student, teacher, ds, tau):
    rt = init_runtime("cpu", "fp32")
    t = EvalTransform(ds.image_size)
    s_logits, _ = predict(student, ds, rt, t)
    t_logits, _ = predict(teacher, ds, rt, t)
    p_t = torch.softmax(t_logits / tau, 1)
    kl = (p_t * (torch.log_softmax(t_logits / tau, 1) - torch.log_softmax(s_logits / tau, 1))).sum(1).mean().item()
    agreement = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean().item()
    return kl, agreement


def test_distillation_moves_student_toward_teacher(tiny_finetuned, tmp_path):
    teacher_dir = tiny_finetuned[0]
    teacher, _ = load_model(teacher_dir, "classifier")
    cfg = make_config("distill", out=str(tmp_path / "d"), teacher=str(teacher_dir), depth=18, width=0.0625,
                      epochs=4, batch_size=32, lr=0.2, **TINY)
    result = distill(cfg)
    student, meta = load_model(tmp_path / "d", "classifier")
    assert meta.temperature == 1.0 and meta.self_distillation is False  # big-to-small default
    initial = build_model(meta.model)
    train = load_dataset("digits", "train")
    kl_after, agree_after = _kl_and_agreement(student, teacher, train, 1.0)
    kl_before, agree_before = _kl_and_agreement(initial, teacher, train, 1.0)
    assert kl_after < 0.7 * kl_before
    assert agree_after > agree_before + 0.3
    assert result["params"] < sum(p.numel() for p in teacher.parameters())


def test_self_distillation_from_the_teacher_starts_as_the_teacher(tiny_pretrained, tiny_finetuned, tmp_path):
    # lr 0: training moves nothing but BN running statistics, so the student's parameters are the
    # teacher's, head layer and classifier included (not a fresh classifier on its encoder)
    teacher, tmeta = load_model(tiny_finetuned[0], "classifier")
    cfg = make_config("distill", out=str(tmp_path), teacher=str(tiny_finetuned[0]), epochs=1, batch_size=128, lr=0.0,
                      init_from=str(tiny_finetuned[0]), **TINY)
    distill(cfg)
    student, meta = load_model(tmp_path, "classifier")
    assert meta.model.head_layer == tmeta.model.head_layer == 1
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    assert t_params.keys() == s_params.keys()
    for k in t_params:
        assert torch.equal(t_params[k], s_params[k]), k
    # from a pretrained (not a classifier) checkpoint only the encoder is taken: plain encoder + fc
    pre_dir = tiny_pretrained[0]
    distill(make_config("distill", out=str(tmp_path / "from_pre"), teacher=str(tiny_finetuned[0]), epochs=1,
                        batch_size=128, lr=0.0, init_from=str(pre_dir), **TINY))
    student, meta = load_model(tmp_path / "from_pre", "classifier")
    pretrained, _ = load_model(pre_dir)
    assert meta.model.head_layer == 0 and len(student.head.layers) == 0
    for k, v in pretrained.encoder.named_parameters():
        assert torch.equal(v, dict(student.encoder.named_parameters())[k]), k


def test_distillation_adapts_the_classifier_and_finetuning_does_not(tiny_pretrained, tiny_finetuned):
    from simclrv2.engine import build_optimizer
    from simclrv2.losses import DistillationLoss
    from simclrv2.stages.classify import DistillTask, SupervisedTask

    rt = init_runtime("cpu", "fp32")
    model, _ = load_model(tiny_finetuned[0], "classifier")
    teacher, _ = load_model(tiny_finetuned[0], "classifier")

    def adapted(task, cfg):
        opt = build_optimizer(task.model, cfg, task.lars_excluded)
        return {id(p) for g in opt.param_groups if g["layer_adaptation"] for p in g["params"]}

    dcfg = make_config("distill", out="unused", teacher="unused", **TINY)
    # a student that starts as the trained teacher (what distill() does for self-distillation from the teacher)
    distilling = DistillTask(model, dcfg, 8, rt, teacher=teacher, distill=DistillationLoss(0.1), adapt_classifier=True)
    assert id(model.fc.weight) in adapted(distilling, dcfg) and id(model.fc.bias) not in adapted(distilling, dcfg)
    # a fresh student's near-zero classifier: LARS's step is proportional to ||w||, so it stays plainly stepped
    fresh = DistillTask(model, dcfg, 8, rt, teacher=teacher, distill=DistillationLoss(1.0))
    assert id(model.fc.weight) not in adapted(fresh, dcfg)
    fcfg = make_config("finetune", out="unused", pretrained="unused", **TINY)
    finetuning = SupervisedTask(model, fcfg, 8, rt)  # zero-initialised classifier: LARS would never move it
    assert id(model.fc.weight) not in adapted(finetuning, fcfg)
    assert id(model.encoder.conv1.weight) in adapted(finetuning, fcfg)


def test_self_distillation_defaults(tiny_finetuned, tmp_path):
    cfg = make_config("distill", out=str(tmp_path), teacher=str(tiny_finetuned[0]), epochs=1, batch_size=128,
                      init_from=str(tiny_finetuned[0]), **TINY)
    distill(cfg)
    _, meta = load_model(tmp_path, "classifier")
    assert meta.self_distillation and meta.temperature == 0.1
    assert meta.model.depth == 18 and meta.model.width == 0.125


def test_linear_eval_freezes_encoder_and_bn_statistics(tiny_pretrained, tmp_path):
    cfg = make_config("linear_eval", out=str(tmp_path), pretrained=str(tiny_pretrained[0]), epochs=10, batch_size=16,
                      lr=1.0, **TINY)
    result = linear_eval(cfg)
    before, _ = load_model(tiny_pretrained[0], "simclr")
    after, _ = load_model(tmp_path, "classifier")
    for k, v in before.encoder.state_dict().items():
        assert torch.equal(v, after.encoder.state_dict()[k]), k  # weights and BN running stats
    assert result["top1"] > 20


def test_supervised_baseline_learns(tmp_path):
    cfg = make_config("supervised", out=str(tmp_path), depth=18, width=0.125, epochs=30, batch_size=48,
                      pad_crop=1, **TINY)
    result = supervised(cfg)
    assert result["top1"] > 30
    again = evaluate(str(tmp_path))
    # the same weights from the checkpoint; a borderline image may flip with the thread count /
    # batch shape oneDNN sees (1 image of 360 = 0.28 points)
    assert again["top1"] == pytest.approx(result["top1"], abs=0.6)


def test_memory_queue_state_travels_through_its_state_dict():
    """The EMA copy and the queue are a submodule and buffers: their state_dict is the whole state,
    and loading it into a fresh MemoryQueue gives the same negatives and the same next enqueue."""
    from simclrv2.models import model_spec
    from simclrv2.stages.pretrain import MemoryQueue

    torch.manual_seed(0)
    model = build_model(model_spec("simclr", depth=18, width=0.0625, sk=False, small_images=True, in_channels=1))
    a = MemoryQueue(model, size=10, dim=128, decay=0.9, device=torch.device("cpu"))
    for _ in range(3):  # 12 keys into 10 slots: wrapped around
        a.enqueue(torch.nn.functional.normalize(torch.randn(4, 128), dim=1))
    with torch.no_grad():
        model.encoder.conv1.weight.add_(1.0)
    a.update(model)
    state = a.state_dict()
    assert {"queue", "queue_len", "queue_ptr"} <= state.keys() and all(
        k.startswith("ema.") for k in state.keys() - {"queue", "queue_len", "queue_ptr"})
    assert int(state["queue_len"]) == 10 and int(state["queue_ptr"]) == 2
    b = MemoryQueue(build_model(model_spec("simclr", depth=18, width=0.0625, sk=False, small_images=True,
                                           in_channels=1)), size=10, dim=128, decay=0.9, device=torch.device("cpu"))
    assert b.negatives() is None
    b.load_state_dict(state)
    assert torch.equal(b.negatives(), a.negatives()) and b.negatives().shape == (10, 128)
    for k, v in a.ema.state_dict().items():
        assert torch.equal(v, b.ema.state_dict()[k]), k
    keys = torch.nn.functional.normalize(torch.randn(3, 128), dim=1)
    a.enqueue(keys), b.enqueue(keys)
    assert torch.equal(a.queue, b.queue) and torch.equal(b.queue[2:5], keys) and int(b.queue_ptr) == 5


def test_memory_queue_fills_with_ema_keys(tmp_path):
    cfg = make_config("pretrain", out=str(tmp_path), depth=18, width=0.0625, epochs=1, batch_size=64, memory_size=200,
                      memory_decay=0.9, knn_every=0, temperature=0.5, blur=False, **TINY)
    pretrain(cfg)
    tensors, meta = ckpt.load_checkpoint(tmp_path / "last.safetensors")
    queue, n = tensors["extra.queue"], int(tensors["extra.queue_len"])
    assert n == 200  # 22 steps x 128 keys wrapped around the 200 slots
    assert torch.allclose(queue.norm(dim=1), torch.ones(200), atol=1e-4)
    ema = {k[10:]: v for k, v in tensors.items() if k.startswith("extra.ema.")}
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    w = "encoder.conv1.weight"
    assert not torch.equal(ema[w], model[w])


def test_trainer_steps_driven_by_hand_equal_fit(tmp_path):
    """The public step API (what bench/run.py times): Trainer.step over Trainer.batches, nothing
    resumed, logged or saved, trains the weights Trainer.fit trains; the step hooks see every step."""
    from simclrv2.checkpoint import CheckpointMeta
    from simclrv2.engine import Trainer, step_hook
    from simclrv2.models import model_spec
    from simclrv2.stages.classify import SupervisedTask
    from simclrv2.stages.common import prepare_data

    cfg = make_config("supervised", out=str(tmp_path / "fit"), depth=18, width=0.0625, epochs=2, batch_size=48,
                      checkpoint_every=3, **TINY)
    rt = init_runtime("cpu", "fp32")
    data = prepare_data(cfg)
    spec = model_spec("classifier", depth=18, width=0.0625, sk=False, small_images=True, in_channels=1,
                      head_layers=0, num_classes=10, image_size=data.image_size)

    def trainer(out):
        torch.manual_seed(0)
        task = SupervisedTask(build_model(spec), cfg, data.image_size, rt)
        return Trainer(task, cfg, rt, data.labeled, out, CheckpointMeta("supervised", spec))

    fitted = trainer(tmp_path / "fit")
    result = fitted.fit()
    assert result.steps == fitted.total == 2 * (len(data.labeled) // 48) and fitted.step_count == fitted.total
    assert ckpt.read_meta(tmp_path / "fit" / "final.safetensors").step == fitted.total
    by_hand, seen = trainer(tmp_path / "hand"), []
    by_hand.task.train()
    with step_hook(lambda t: seen.append(t.step_count)):
        for images, labels in by_hand.batches():
            loss, _ = by_hand.step(images, labels)
            assert torch.isfinite(loss)
    assert seen == list(range(1, fitted.total + 1)) and not (tmp_path / "hand").exists()
    for k, v in fitted.task.model.state_dict().items():
        assert torch.equal(v, by_hand.task.model.state_dict()[k]), k


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    from simclrv2.engine import step_hook

    base = dict(depth=18, width=0.0625, epochs=3, batch_size=48, checkpoint_every=2, **TINY)
    full = supervised(make_config("supervised", out=str(tmp_path / "a"), **base))

    def interrupt(trainer):
        if trainer.step_count == 5:  # after step 5's update, before anything of it is written
            raise KeyboardInterrupt

    with step_hook(interrupt), pytest.raises(KeyboardInterrupt):
        supervised(make_config("supervised", out=str(tmp_path / "b"), **base))
    assert ckpt.read_meta(tmp_path / "b" / "last.safetensors").step == 4
    assert not (tmp_path / "b" / "final.safetensors").exists()
    resumed = supervised(make_config("supervised", out=str(tmp_path / "b"), resume=True, **base))
    a, _ = ckpt.load_checkpoint(tmp_path / "a" / "final.safetensors")
    b, _ = ckpt.load_checkpoint(tmp_path / "b" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k
    assert resumed["top1"] == pytest.approx(full["top1"])


def test_wrong_checkpoint_kind_is_a_clear_error(tiny_pretrained, tmp_path):
    with pytest.raises(CheckpointError, match="expected a classifier"):
        distill(make_config("distill", out=str(tmp_path), teacher=str(tiny_pretrained[0]), **TINY))
    with pytest.raises(CheckpointError, match="not found"):
        finetune(make_config("finetune", out=str(tmp_path), pretrained=str(tmp_path / "nope.safetensors"), **TINY))


def test_batch_larger_than_dataset_is_capped(tmp_path, caplog):
    """144 labelled digits and --batch-size 1000: batches of all 144 (the lr scaled for 144), at least --min-steps."""
    logger = logging.getLogger("simclrv2")  # (propagates nothing once the CLI has set up logging)
    logger.addHandler(caplog.handler)
    try:
        result = supervised(make_config("supervised", out=str(tmp_path), depth=18, width=0.0625, batch_size=1000,
                                        epochs=1, **dict(TINY, min_steps=3)))
    finally:
        logger.removeHandler(caplog.handler)
    assert "--batch-size 1000 is more than the 144 training images: batches of 144" in caplog.text
    meta = ckpt.read_meta(tmp_path / "final.safetensors")
    assert (meta.steps_per_epoch, meta.total_steps, result["labeled_images"]) == (1, 3, 144)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(0.1 * 144 / 256)  # the first step's: the peak for a batch of 144


def test_a_head_layer_the_pretrained_model_lacks_is_a_one_line_error(tiny_pretrained, tmp_path, capsys):
    from simclrv2.cli import main

    rc = main(["-q", "linear-eval", "--out", str(tmp_path / "lin"), "--pretrained", str(tiny_pretrained[0]),
               "--dataset", "digits", "--head-layer", "4", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--head-layer 4 is not available" in err and "has 3 head layers" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
