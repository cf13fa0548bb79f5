"""bench/gpu_smoke.py keeps working: its CPU mode (--device cpu --quick) runs every section.

The CUDA-only parts (SyncBatchNorm kernels, CUDA-vs-CPU augmentation, GPU memory) are skipped
on the CPU with a printed reason; the script itself is meant for a GPU machine (README).
--precision auto, as a user runs it: bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_smoke.py"


@pytest.mark.slow
def test_gpu_smoke_runs_every_section_on_the_cpu():
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parent.parent / "src"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_smoke

    for name in gpu_smoke.SECTIONS:  # every section reported, in the summary table too
        assert f"| {name} | PASS |" in out or f"| {name} | SKIP |" in out, name
    assert "| pretrain | PASS |" in out and "| throughput | PASS |" in out
    assert "CUDA" in out  # the CUDA-only parts say why they did not run


def test_a_failing_section_is_reported_and_the_rest_runs(monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_smoke

    def broken(ctx):
        raise ValueError("Expected a torch.device with a specified index or an integer,\n but got:cuda")

    monkeypatch.setitem(gpu_smoke.SECTIONS, "environment", broken)
    code = gpu_smoke.main(["--device", "cpu", "--quick", "--section", "environment", "--section", "sync_bn"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL environment" in out and "ValueError: Expected a torch.device with a specified index" in out
    assert "PASS sync_bn" in out and "FAILED: environment" in out
