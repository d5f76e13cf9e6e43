"""Helpers the benchmark scripts share: peak-RSS measurement on Linux and the machine description
that every result JSON records. Imported as ``_common`` (the scripts run as
``python benchmarks/<name>.py``, which puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

# For the processes that measure memory. glibc raises its mmap threshold each time a large block
# is freed; from then on blocks of that size come from the heap, whose freed pages stay resident,
# so RSS left over from an earlier step would hide the measured step's peak (and heap reuse can
# overstate it). A fixed threshold gives every large tensor its own mapping, which free()
# returns, so RSS rises and falls with live tensors. It also adds page faults that slow the
# step, which is why time is measured in separate processes with the default allocator.
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def read_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field")


def peak_rss_rise(step: Callable[[], object]) -> int:
    """Bytes by which ``step`` raises this process's peak resident set above its current one."""
    # Writing 5 resets VmHWM, the peak resident set, to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    baseline = read_status_bytes("VmHWM")
    step()
    return read_status_bytes("VmHWM") - baseline


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine() -> Dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def random_clip_inputs(
    image_size: int, context_length: int, vocab_size: int, batch: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and full-length captions that end in the EOT token (the largest id, where the
    text tower pools), on the CPU; a seeded ``generator`` makes them reproducible."""
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(1, vocab_size - 1, (batch, context_length), generator=generator)
    tokens[:, -1] = vocab_size - 1
    return images, tokens


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> Dict[str, str]:
    """What torchrun would set for one rank on this machine; clipdist's DistEnv reads it."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def run_ranks(commands: List[List[str]], envs: List[Dict[str, str]], what: str, grace_s: float = 10.0) -> List[Dict[str, Any]]:
    """Run one process per rank and return the JSON each printed last, in rank order.

    Output goes to files, not pipes: a rank blocked on a full pipe would stall its peers in a
    collective. A failed rank raises RuntimeError with the stderr of every failed rank."""
    with tempfile.TemporaryDirectory(prefix="clipdist_bench_") as tmp:
        logs = [(Path(tmp) / f"{rank}.out", Path(tmp) / f"{rank}.err") for rank in range(len(commands))]
        processes = []
        for command, env, (out_path, err_path) in zip(commands, envs, logs):
            with open(out_path, "w") as out, open(err_path, "w") as err:
                processes.append(subprocess.Popen(command, stdout=out, stderr=err, env=env))
        codes = wait_all_or_kill(processes, grace_s)
        if any(codes):
            failures = [f"--- rank {rank} exited with {code}:\n{logs[rank][1].read_text()[-3000:]}" for rank, code in enumerate(codes) if code]
            raise RuntimeError(f"{what} failed:\n" + "\n".join(failures))
        return [json.loads(out_path.read_text().strip().splitlines()[-1]) for out_path, _ in logs]


def wait_all_or_kill(processes: List[subprocess.Popen], grace_s: float = 10.0) -> List[int]:
    """Wait for every rank; once one fails, the others are stuck in a collective, so give them
    ``grace_s`` to notice and then kill them. The exit codes, in order."""
    failed_at: Optional[float] = None
    while any(p.poll() is None for p in processes):
        if failed_at is None and any(p.poll() not in (None, 0) for p in processes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() > failed_at + grace_s:
            for p in processes:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return [p.wait() for p in processes]


def write_result(out: Path, result: Dict[str, Any], started: float) -> None:
    """``result`` and the seconds since ``started`` (time.perf_counter) as indented JSON at ``out``,
    written atomically so that an interrupted run never leaves half a file."""
    from clipdist.fileio import write_text_atomically

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps({**result, "total_seconds": time.perf_counter() - started}, indent=2) + "\n")
