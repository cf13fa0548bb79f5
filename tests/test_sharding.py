"""Work spread over torchrun processes, on CPU (gloo), against one process doing all of it.

* The image check: each process decodes only its share of the files (in several rounds, with a
  collective per round), and every process learns every unreadable file; the cache then holds
  every file once, so a second check decodes nothing.
* ``--compile`` with DDP and global BatchNorm: a compiled step gives the eager step's loss,
  gradients and running statistics on every process (the BN's collectives break the graph).
* Evaluation: each process predicts a contiguous block of the rows (on-disk images through a
  DataLoader worker, in-memory ones directly) and every process gets all rows, in order, equal
  to one process predicting the whole split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _sharding_worker as worker
from simclrv2.data import ImageFolderDataset, image_check
from simclrv2.runtime import Runtime

pytestmark = pytest.mark.slow  # multi-process end-to-end: deselect with -m 'not slow'

BAD = ["train/b/b1.png", "train/c/c4.png"]


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 7), ("val", 5)):
        for c in "abc":
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (16 + i, 20, 3), dtype=np.uint8)).save(d / f"{c}{i}.png")
    for name in BAD:
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharding")
    root, out = make_folder(base / "data"), base / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["SIMCLRV2_CACHE_DIR"] = str(base / "cache")
    # inductor compiles in its own thread/process pool by default; on a loaded machine a rank exiting
    # while that pool winds down aborted ("terminate called without an active exception", SIGABRT)
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(worker.__file__)), str(root), str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return root, out, base / "cache"


def test_each_process_checks_its_share_and_all_learn_every_bad_file(run, monkeypatch):
    root, out, cache = run
    results = [json.loads((out / f"check.{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert sorted(i for i, _ in r["bad"]) == BAD  # every process knows both, though each decoded one share
        assert all("cannot decode image" in reason for _, reason in r["bad"])
    assert [r["counts"] for r in results] == [{"decoded": 11, "cached": 0}, {"decoded": 10, "cached": 0}]
    # rank 0 cached every file once (rows gathered from both processes): a new check decodes nothing
    monkeypatch.setenv("SIMCLRV2_CACHE_DIR", str(cache))
    lines = image_check.cache_path(str(root), "train", 16).read_text().splitlines()
    assert sorted(json.loads(line)[0] for line in lines) == sorted(ImageFolderDataset(root, "train", 16).ids)
    bad, counts = image_check.unreadable_images(ImageFolderDataset(root, "train", 16), workers=0)
    assert sorted(i for i, _ in bad) == BAD and counts == {"decoded": 0, "cached": 21}


@pytest.mark.parametrize("name", ["folder", "digits"])
def test_sharded_predictions_equal_one_process(run, monkeypatch, name):
    root, out, _ = run
    monkeypatch.setattr(sys, "argv", ["worker", str(root)])
    reference, labels = worker.predictions(Runtime(torch.device("cpu"), None))[name]
    for rank in (0, 1):
        got = np.load(out / f"{name}.{rank}.npy")
        assert got.shape == tuple(reference.shape)
        np.testing.assert_allclose(got, reference.numpy(), rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        np.testing.assert_array_equal(np.load(out / f"{name}_labels.{rank}.npy"), labels.numpy())


def test_compiled_ddp_step_with_global_batchnorm_equals_eager(run):
    _, out, _ = run
    results = [json.loads((out / f"compile.{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["loss"] != results[1]["loss"]  # each rank had its own rows
    for r in results:
        assert r["loss_diff"] <= 1e-6 * abs(r["loss"])
        assert r["grad_diff"] <= 1e-5 * r["grad_scale"] and r["running_var_diff"] <= 1e-6
