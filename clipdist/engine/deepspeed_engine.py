"""The one place where a CLIP model is wrapped for training: DeepSpeed config, optimizer, schedule."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict

import torch
from torch import nn

from clipdist.config import DeepSpeedConfig, OptimConfig
from clipdist.engine.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def select_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def effective_precision(cfg: DeepSpeedConfig) -> DeepSpeedConfig:
    """bf16/fp16 recipes train in fp32 where there is no GPU: CPUs emulate half-precision
    matmuls hundreds of times slower, so a recipe's smoke run on a laptop would never finish."""
    if cfg.precision == "fp32" or torch.cuda.is_available():
        return cfg
    log.warning("deepspeed.precision=%s needs a GPU; training in fp32 on this CPU-only machine", cfg.precision)
    return dataclasses.replace(cfg, precision="fp32")


def deepspeed_config(cfg: DeepSpeedConfig, *, local_batch: int, accum_steps: int, world_size: int) -> Dict[str, Any]:
    """DeepSpeed's JSON config, derived from the typed sections so the batch sizes always agree."""
    return {
        "train_batch_size": local_batch * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # ZeRO with a torch AdamW is fine; DeepSpeed only whitelists its own optimizers.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 1 << 30,  # our logger reports progress
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: nn.Module,
    optim_cfg: OptimConfig,
    ds_cfg: DeepSpeedConfig,
    *,
    local_batch: int,
    accum_steps: int,
    world_size: int,
    total_steps: int,
    load_universal: bool = False,
):
    """Wrap the model in a DeepSpeed engine with torch AdamW and a warmup + cosine schedule.
    ``load_universal``: the checkpoint it will load is a universal one (engine/checkpoint.py).

    Returns the engine; `engine.step()` steps optimizer and schedule together."""
    select_accelerator()
    import deepspeed

    # DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm's running statistics
    # must match, so cast the whole module first (DeepSpeed keeps fp32 master weights). Moved to
    # the device DeepSpeed would move it to, so that the optimizer sees where its parameters live
    # (a fused AdamW kernel on CUDA).
    model = model.to(engine_device(), input_dtype(ds_cfg))
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config={
            **deepspeed_config(ds_cfg, local_batch=local_batch, accum_steps=accum_steps, world_size=world_size),
            "checkpoint": {"load_universal": load_universal},
        },
    )
    return engine


def engine_device() -> torch.device:
    """This process's accelerator (LOCAL_RANK, as DeepSpeed picks it), the CPU without one."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def input_dtype(ds_cfg: DeepSpeedConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ds_cfg.precision]
