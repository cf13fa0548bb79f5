"""The official SimCLR TF2 pretraining step (google-research/simclr, ``tf2/``) on ready-made tensors.

The reference for issue 18 ("faster than the original on the same CPU"): the official model
(``model.Model``: ResNet + 3-layer projection head + the online linear head), NT-Xent
(``objective.add_contrastive_loss``), the supervised loss of the online head, weight decay as
``run.py`` adds it, and ``lars_optimizer.LARSOptimizer``, in one ``tf.function`` as ``run.py``'s
``single_step``. No input pipeline: both views are ready-made float tensors (the official
augmentations run in ``tf.data``, outside the step), so it is compared with our whole step,
augmentations included, and with our bare step (``bench/run.py --section kernel_r18``).

TensorFlow and this project's torch do not share an environment here; set one up once::

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0
    git clone https://github.com/google-research/simclr /tmp/simclr     # measured at 383d4143

Then (``TF_USE_LEGACY_KERAS=1``: the official code is Keras 2 code)::

    TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python bench/official_tf2_step.py --simclr-dir /tmp/simclr --reps 5

prints images/s per repetition. ``--serve``: after the warm-up, print ``ready`` and then, for
each line ``N`` read from stdin, run N steps and print ``{"seconds": ...}``; ``bench/vs_official.py``
drives it that way, interleaved with our step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def define_flags(flags, a) -> None:
    """The flags of the official ``run.py`` that the model, loss and optimiser read (``run.py``
    itself needs ``tensorflow_datasets``), with this benchmark's values."""
    f = flags
    f.DEFINE_integer("resnet_depth", a.depth, "")
    f.DEFINE_float("width_multiplier", a.width, "")
    f.DEFINE_integer("image_size", a.image_size, "")
    f.DEFINE_float("sk_ratio", 0.0, "")
    f.DEFINE_float("se_ratio", 0.0, "")
    f.DEFINE_bool("global_bn", False, "")  # one device: plain BN, as ours on one process
    f.DEFINE_float("batch_norm_decay", 0.9, "")
    f.DEFINE_string("train_mode", "pretrain", "")
    f.DEFINE_bool("lineareval_while_pretraining", True, "")  # the online head, as our probe
    f.DEFINE_integer("fine_tune_after_block", -1, "")
    f.DEFINE_bool("use_blur", False, "")  # applied in the step when on: off here, as ours
    f.DEFINE_string("proj_head_mode", "nonlinear", "")
    f.DEFINE_integer("proj_out_dim", 128, "")
    f.DEFINE_integer("num_proj_layers", 3, "")
    f.DEFINE_integer("ft_proj_selector", 0, "")
    f.DEFINE_string("optimizer", "lars", "")
    f.DEFINE_float("momentum", 0.9, "")
    f.DEFINE_float("weight_decay", 1e-6, "")
    f.DEFINE_float("temperature", 0.5, "")
    f.DEFINE_bool("hidden_norm", True, "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--simclr-dir", required=True, help="a checkout of github.com/google-research/simclr")
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=32, help="pixels (<= 32: the CIFAR stem)")
    p.add_argument("--batch", type=int, default=256, help="images per step (two views each)")
    p.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads (inter-op: 1)")
    p.add_argument("--steps", type=int, default=3, help="steps per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="steps before timing (the first traces the graph)")
    p.add_argument("--serve", action="store_true", help="run N steps per stdin line N (see the module doc)")
    a = p.parse_args(argv)
    tf2 = os.path.join(os.path.abspath(a.simclr_dir), "tf2")
    if not os.path.isfile(os.path.join(tf2, "model.py")):
        raise SystemExit(f"--simclr-dir {a.simclr_dir}: no tf2/model.py (expected a google-research/simclr checkout)")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    sys.path.insert(0, tf2)
    from absl import flags
    import tensorflow.compat.v2 as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    define_flags(flags, a)
    flags.FLAGS(["official_tf2_step"])
    import lars_optimizer
    import model as model_lib
    import objective as obj_lib

    num_classes = 10
    model = model_lib.Model(num_classes)
    # lr as our kernel sections' (0.3 x sqrt(256)); constant: the schedule is not what is timed
    optimizer = lars_optimizer.LARSOptimizer(
        0.3 * a.batch ** 0.5, momentum=0.9, weight_decay=1e-6,
        exclude_from_weight_decay=["batch_normalization", "bias", "head_supervised"])
    g = tf.random.Generator.from_seed(0)
    # NHWC, the two views on the channel axis as the official input pipeline delivers them
    features = g.uniform((a.batch, a.image_size, a.image_size, 6))
    labels = tf.one_hot(g.uniform((a.batch,), 0, num_classes, dtype=tf.int32), num_classes)

    @tf.function
    def step():  # run.py's single_step without the summaries and metrics
        with tf.GradientTape() as tape:
            proj, sup = model(features, training=True)
            loss, _, _ = obj_lib.add_contrastive_loss(proj, hidden_norm=True, temperature=0.5, strategy=None)
            loss += obj_lib.add_supervised_loss(labels=tf.concat([labels, labels], 0), logits=sup)
            loss += model_lib.add_weight_decay(model, adjust_per_optimizer=True)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        float(loss)  # wait for the last step
        return time.perf_counter() - t0

    run(a.warmup)
    params = sum(int(tf.size(v)) for v in model.trainable_variables)
    if a.serve:
        print(json.dumps({"ready": True, "tensorflow": tf.__version__, "trainable_parameters": params}), flush=True)
        for line in sys.stdin:
            if line.strip():
                print(json.dumps({"seconds": run(int(line))}), flush=True)
        return 0
    rates = [a.batch * a.steps / run(a.steps) for _ in range(a.reps)]
    print(json.dumps({"tensorflow": tf.__version__, "trainable_parameters": params, "batch": a.batch,
                      "images_per_s": [round(r, 2) for r in rates]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
