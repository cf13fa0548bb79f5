"""The CUDA code paths, run on a machine without a GPU: ``torch.cuda.*`` queries patched.

What is tested is our logic around CUDA: which device a process takes (with its index, as
``torch.cuda.set_device`` and DDP need), which precision ``auto`` picks on which GPU, TF32, the
process group's backend and timeout under torchrun, SyncBatchNorm conversion, DDP's device ids,
and the errors a user gets. The kernels themselves need a GPU: ``bench/gpu_smoke.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from torch import nn

from simclrv2 import cli, distributed
from simclrv2.errors import ConfigError
from simclrv2.models import build_model, model_spec
from simclrv2.runtime import Runtime, init_runtime


class FakeCuda:
    """Stands in for the torch.cuda queries our code makes; records set_device calls."""

    def __init__(self, monkeypatch, count: int = 2, capability: tuple[int, int] = (8, 0), current: int = 0):
        self.count, self.capability, self.current = count, capability, current
        self.set_devices: list[torch.device] = []
        self.capability_asked: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self._set_device)
        monkeypatch.setattr(torch.cuda, "get_device_capability", self._capability)
        # what torch.cuda.is_bf16_supported() says on a V100/T4: True, through emulation
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.version, "hip", None)

    def _set_device(self, device):
        device = torch.device(device)
        if device.index is None:  # what torch itself does
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        self.set_devices.append(device)

    def _capability(self, device=None):
        self.capability_asked.append(device)
        return self.capability


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.conv.fp32_precision
    benchmark = torch.backends.cudnn.benchmark
    yield monkeypatch
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.conv.fp32_precision = cudnn_tf32
    torch.backends.cudnn.benchmark = benchmark


def test_auto_device_takes_an_indexed_gpu(clean_env):
    cuda = FakeCuda(clean_env, current=1)  # e.g. CUDA_VISIBLE_DEVICES or an earlier set_device chose GPU 1
    rt = init_runtime("auto", "auto")
    assert rt.device == torch.device("cuda", 1) and cuda.set_devices == [torch.device("cuda", 1)]
    rt = init_runtime("cuda", "fp32")
    assert rt.device == torch.device("cuda", 1)
    rt = init_runtime("cuda:0", "fp32")
    assert rt.device == torch.device("cuda", 0) and cuda.set_devices[-1] == torch.device("cuda", 0)


def test_torchrun_process_takes_its_local_rank_gpu(clean_env):
    cuda = FakeCuda(clean_env, count=4)
    clean_env.setenv("LOCAL_RANK", "3")
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1 sets LOCAL_RANK too
    rt = init_runtime("auto", "auto")
    assert rt.device == torch.device("cuda", 3) and cuda.set_devices == [torch.device("cuda", 3)]


def test_torchrun_group_uses_nccl_with_the_timeout(clean_env):
    FakeCuda(clean_env, count=2)
    calls = []
    clean_env.setattr(torch.distributed, "is_initialized", lambda: False)
    clean_env.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    for k, v in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    rt = init_runtime("cuda", "auto", dist_timeout=120)
    assert rt.device == torch.device("cuda", 1) and (rt.rank, rt.world_size, rt.local_rank) == (1, 2, 1)
    assert calls == [("nccl", {"timeout": timedelta(seconds=120)})]
    with pytest.raises(ConfigError, match="names one GPU but torchrun started 2 processes"):
        init_runtime("cuda:0", "auto")


@pytest.mark.parametrize("device,count,needle", [
    ("cuda:2", 2, "--device cuda:2: only 2 CUDA device"),
    ("cuda", 0, "only 0 CUDA device"),
    ("mps", 2, "--device 'mps' is not supported"),
])
def test_devices_that_are_not_there_are_config_errors(clean_env, device, count, needle):
    FakeCuda(clean_env, count=count)
    with pytest.raises(ConfigError, match=needle):
        init_runtime(device, "fp32")


def test_no_cuda_is_a_one_line_error_through_the_cli(clean_env, capsys, tmp_path):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["pretrain", "--out", str(tmp_path / "o"), "--dataset", "digits", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["simclrv2: error: --device cuda was asked for but no CUDA device is available"]


@pytest.mark.parametrize("capability,auto", [((7, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16),
                                             ((9, 0), torch.bfloat16)])
def test_auto_precision_counts_only_native_bf16(clean_env, capability, auto):
    """V100 (7.0) and T4 (7.5) emulate bf16 (torch.cuda.is_bf16_supported() says True): auto is fp32 there."""
    FakeCuda(clean_env, capability=capability)
    assert init_runtime("cuda", "auto").dtype == auto
    if auto is None:
        with pytest.raises(ConfigError, match="fp16 .with loss scaling. or fp32"):
            init_runtime("cuda", "bf16")
    rt = init_runtime("cuda", "fp16")  # the explicit choice for those GPUs, with loss scaling
    assert rt.dtype == torch.float16 and rt.precision == "fp16"
    scaler = rt.grad_scaler()
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cuda"


def test_fp16_is_refused_on_the_cpu(clean_env):
    with pytest.raises(ConfigError, match="fp16 is for CUDA GPUs"):
        init_runtime("cpu", "fp16")


@pytest.mark.parametrize("precision,tf32,expected", [
    ("fp32", None, "highest"),  # fp32 asked for is IEEE fp32
    ("fp32", True, "high"),
    ("auto", None, "high"),
    ("bf16", False, "highest"),
])
def test_tf32_follows_the_option_and_precision(clean_env, precision, tf32, expected):
    FakeCuda(clean_env)
    init_runtime("cuda", precision, tf32=tf32)
    assert torch.get_float32_matmul_precision() == expected
    assert torch.backends.cudnn.conv.fp32_precision == ("tf32" if expected == "high" else "ieee")


def test_ntxent_similarities_run_in_ieee_fp32_under_tf32(clean_env):
    from simclrv2.losses import NTXentLoss

    seen = []
    original = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.get_float32_matmul_precision())
        return original(a, b)

    torch.set_float32_matmul_precision("high")
    clean_env.setattr(torch.Tensor, "__matmul__", spy)
    loss = NTXentLoss(0.1)(torch.randn(4, 8), torch.randn(4, 8))
    assert torch.isfinite(loss) and seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "high"  # restored


def test_autocast_choice_on_cuda(clean_env):
    FakeCuda(clean_env)
    for dtype in (torch.bfloat16, torch.float16):
        ctx = Runtime(torch.device("cuda", 0), dtype).autocast()
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    assert not isinstance(Runtime(torch.device("cuda", 0), None).autocast(), torch.autocast)


def test_sync_batchnorm_conversion_and_ddp_device_ids(clean_env):
    """Under torchrun on GPUs: every BN becomes nn.SyncBatchNorm (same state_dict keys), and DDP gets
    the process's GPU index."""
    spec = model_spec("simclr", depth=18, width=0.125, sk=False, small_images=True, in_channels=3, num_classes=10)
    model = build_model(spec)
    keys = list(model.state_dict())
    wrapped = []

    class FakeDDP(nn.Module):
        def __init__(self, module, device_ids=None, **kw):
            super().__init__()
            wrapped.append((module, device_ids, kw))

    clean_env.setattr(distributed, "DDP", FakeDDP)
    rt = Runtime(torch.device("cuda", 1), torch.bfloat16, rank=1, world_size=2, local_rank=1)
    distributed.wrap_model(model, rt, sync_bn=True)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert list(model.state_dict()) == keys
    assert wrapped[0][0] is model and wrapped[0][1] == [1]
    # on the CPU (gloo) the same call uses our GlobalBatchNorm
    cpu_model = build_model(spec)
    distributed.wrap_model(cpu_model, Runtime(torch.device("cpu"), None, rank=0, world_size=2), sync_bn=True)
    assert all(isinstance(m, distributed.GlobalBatchNorm) for m in cpu_model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert wrapped[1][1] is None


def test_a_torch_older_than_the_floor_is_a_one_line_error():
    import subprocess
    import sys

    code = ("import torch; torch.__version__ = '2.2.1+cu121'\n"
            "from simclrv2.cli import main; raise SystemExit(main(['presets']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("simclrv2: error: simclrv2 needs torch >= 2.3, found 2.2.1+cu121; "
                                   "upgrade torch (pip install --upgrade torch)")
