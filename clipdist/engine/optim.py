"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from clipdist.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Decay matrices only: biases, norms (all ndim < 2), embeddings and logit_scale get none,
    as in CLIP; decaying the temperature or the embeddings hurts contrastive training."""
    exempt = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # A torch optimizer, not DeepSpeed's "AdamW" (which compiles a C++ extension first).
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **adamw_kernel(groups))


def adamw_kernel(groups: List[dict]) -> dict:
    """One fused kernel for all parameters where every parameter is on CUDA; elsewhere the
    multi-tensor (foreach) path: a handful of kernels per step instead of ~10 per parameter.
    DeepSpeed's ZeRO/bf16 optimizers swap in flat fp32 copies on the same device, which both
    kernels take as well. Same update as the per-parameter loop, up to rounding."""
    params = [p for group in groups for p in group["params"]]
    if params and all(p.is_cuda for p in params):
        return {"fused": True}
    return {"foreach": True}


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup from ~0 to 1, then cosine down to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio),
    )

