"""Helpers the benchmark scripts share: peak-RSS measurement on Linux and the machine description
that every result JSON records. Imported as ``_common`` (the scripts run as
``python benchmarks/<name>.py``, which puts this folder on sys.path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable, Dict

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
