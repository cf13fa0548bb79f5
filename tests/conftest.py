import os
import tempfile

import pytest
import torch

# the image check's cache (simclrv2.data.image_check) of this test session, not the user's ~/.cache;
# set before anything runs so that subprocesses (torchrun tests) inherit it
os.environ["SIMCLRV2_CACHE_DIR"] = tempfile.mkdtemp(prefix="simclrv2-test-cache-")

# torch threads per test process: the machine's cores shared among pytest-xdist's workers (-n N;
# CI: 2 cores, 2 workers, 1 thread each); SIMCLRV2_TEST_THREADS overrides
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = int(os.environ.get("SIMCLRV2_TEST_THREADS", max(1, (os.cpu_count() or 2) // _WORKERS)))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:  # the CLI runs of the tests (subprocesses) take the same share
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# min_steps=0: these few-step runs train exactly their epochs (the classifier stages' default minimum is 150)
TINY = dict(dataset="digits", precision="fp32", label_fraction=0.1, seed=0, log_every=1000, min_steps=0)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A SimCLRv2 model pretrained for a few epochs on digits (shared by the stage tests)."""
    from simclrv2.config import make_config
    from simclrv2.stages import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    cfg = make_config("pretrain", out=str(out), depth=18, width=0.125, epochs=4, batch_size=128, temperature=0.5,
                      color_strength=0.5, blur=False, crop_min=0.2, knn_every=2, knn_train_size=1437, **TINY)
    result = pretrain(cfg)
    return out, result


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_pretrained, tmp_path_factory):
    from simclrv2.config import make_config
    from simclrv2.stages import finetune

    out = tmp_path_factory.mktemp("finetune")
    cfg = make_config("finetune", out=str(out), pretrained=str(tiny_pretrained[0]), epochs=15, batch_size=48,
                      lr=0.05, pad_crop=1, **TINY)
    return out, finetune(cfg)
