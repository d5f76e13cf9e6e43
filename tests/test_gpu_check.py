"""benchmarks/gpu_check.sh where there is no GPU (every CPU machine, and a GPU one with
CUDA_VISIBLE_DEVICES=""): one line saying so, a JSON that says so, exit status 0. And the ring
memory helper it runs, on the CPU. What the script checks on a GPU is tests/test_cuda.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NO_GPU_LINE = "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check"


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    started = time.monotonic()
    # As a user runs it, from another directory: the script finds the repo by its own path.
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), str(out)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [NO_GPU_LINE], done.stdout
    result = json.loads(out.read_text())
    assert result["gpu"] is None and result["skipped"] == NO_GPU_LINE.removeprefix("gpu_check: ")
    assert result["machine"]["torch"] and "steps" not in result
    assert not (tmp_path / "gpu_check.json.tmp").exists(), "written atomically: no temporary left"
    assert seconds < 60, f"took {seconds:.0f} s"


def test_gpu_check_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("usage: bash benchmarks/gpu_check.sh [OUT.json]")


def test_gpu_ring_memory_runs_on_the_cpu(tmp_path):
    """The helper's CPU smoke mode: every batch measured, with the planner's prediction beside it."""
    out = tmp_path / "ring.json"
    command = [sys.executable, "benchmarks/gpu_ring_memory.py", "--device", "cpu", "--batches", "512", "1024", "--out", str(out)]
    # The allocator setting of benchmarks/_common.py's memory workers: RSS follows the tensors.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert [case["global_batch"] for case in cases] == [512, 1024]
    for case in cases:
        assert case["status"] == "ok" and case["finite_loss_and_grads"] and case["measured_bytes"] > 0
        assert case["predicted_bytes"] > 0, case.get("plan_error")
        assert case["input_bytes"] == 2 * case["global_batch"] * 512 * 4
