"""The capacity planner: per-rank memory by component (memory.py), and the step shape, step
time and largest global batch it implies (choose.py). ``python -m clipdist.plan`` prints it;
``data.local_batch=auto`` trains with it."""

from __future__ import annotations

from typing import Optional

from clipdist.config import Config
from clipdist.plan.choose import Device, DoesNotFit, Plan, choose, largest_global_batch, plan_for, shape_of
from clipdist.plan.memory import GIB, Budget, Shape, budget


def launch_device(cfg: Config) -> Device:
    """launch.gpu_memory_gb per rank, on this machine's kind of device."""
    import torch

    return Device(memory_bytes=int(cfg.launch.gpu_memory_gb * GIB), kind="cuda" if torch.cuda.is_available() else "cpu", peak_tflops=cfg.logging.peak_tflops)


def plan_batch(cfg: Config, world_size: int, accum_steps: Optional[int] = None) -> Plan:
    """The largest micro-batch (and its accumulation) that reaches train.global_batch within
    launch.gpu_memory_gb, with the configured loss and checkpointing. Raises DoesNotFit."""
    return choose(cfg, world_size, cfg.train.global_batch, launch_device(cfg), choose_loss=False, choose_checkpointing=False, accum_steps=accum_steps)


def describe_run_plan(cfg: Config, world_size: int) -> str:
    """One log line: the planned peak of this run's shape against launch.gpu_memory_gb."""
    device = launch_device(cfg)
    shape = shape_of(cfg, world_size, cfg.data.local_batch, cfg.train.accum_steps, device)
    plan = plan_for(cfg, shape, device)
    top = sorted(plan.budget.components.items(), key=lambda item: -item[1])[:3]
    return (
        f"memory plan: peak {plan.budget.peak / GIB:.2f} GiB of {device.memory_bytes / GIB:.2f} GiB per rank ({plan.budget.peak_phase}; "
        + ", ".join(f"{name} {value / GIB:.2f}" for name, value in top)
        + f"){'' if plan.fits else ': OVER'}"
    )


__all__ = ["Budget", "Device", "DoesNotFit", "Plan", "Shape", "budget", "choose", "describe_run_plan", "largest_global_batch", "plan_batch", "plan_for", "shape_of"]
