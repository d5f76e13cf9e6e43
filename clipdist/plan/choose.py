"""Choosing a step's shape: the micro-batch, accumulation, loss implementation and checkpointing
that reach a global batch in a given memory, the step time they imply, and the largest global
batch that fits."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Sequence

from clipdist.config import Config, ModelConfig
from clipdist.perf import training_flops
from clipdist.plan.memory import GIB, Budget, Shape, budget


@dataclass(frozen=True)
class Device:
    memory_bytes: int  # per rank
    kind: str = "cuda"  # "cuda" or "cpu" (plan.memory.Shape.device)
    peak_tflops: Optional[float] = None  # dense bf16 TFLOP/s; None: no step time
    mfu: float = 0.4  # the model-FLOPs utilisation the step time assumes


@dataclass(frozen=True)
class Plan:
    shape: Shape
    budget: Budget
    device: Device
    model_cfg: ModelConfig  # the model as planned (checkpointing as the shape says)

    @property
    def fits(self) -> bool:
        return self.budget.peak <= self.device.memory_bytes

    @property
    def flops_per_rank(self) -> float:
        """Hardware FLOPs of one optimizer step on one rank (recomputation included)."""
        flops = training_flops(self.model_cfg, global_batch=self.shape.global_batch, accum_steps=self.shape.accum_steps)
        return flops.hardware * self.shape.rank_rows

    @property
    def step_seconds(self) -> Optional[float]:
        """At the stated MFU of model FLOPs: hardware FLOPs (what checkpointing and GradCache
        compute twice) cost time too, so they count against the same rate."""
        if not self.device.peak_tflops:
            return None
        return self.flops_per_rank / (self.device.peak_tflops * 1e12 * self.device.mfu)


def shape_of(cfg: Config, world_size: int, micro_batch: int, accum_steps: int, device: Device, *, loss_impl: Optional[str] = None, grad_checkpointing: Optional[bool] = None) -> Shape:
    return Shape(
        world_size=world_size,
        micro_batch=micro_batch,
        accum_steps=accum_steps,
        loss_impl=loss_impl or cfg.loss.impl,
        chunk_size=cfg.loss.chunk_size,
        grad_checkpointing=cfg.model.grad_checkpointing if grad_checkpointing is None else grad_checkpointing,
        zero_stage=cfg.deepspeed.zero_stage,
        precision=cfg.deepspeed.precision,
        device=device.kind,
    )


def plan_for(cfg: Config, shape: Shape, device: Device) -> Plan:
    model = replace(cfg.model, grad_checkpointing=shape.grad_checkpointing)
    return Plan(shape=shape, budget=budget(cfg, shape), device=device, model_cfg=model)


def divisors_descending(n: int) -> List[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def loss_options(cfg: Config, choose_loss: bool) -> Sequence[str]:
    """SigLIP is another loss; gather and ring are one loss computed two ways, so the planner may
    pick either (gather where its [b, B] logits fit: fewer FLOPs, no ring latency)."""
    if not choose_loss or cfg.loss.impl == "siglip":
        return (cfg.loss.impl,)
    return ("gather", "ring")


def checkpointing_options(cfg: Config, choose_checkpointing: bool) -> Sequence[bool]:
    return (False, True) if choose_checkpointing else (cfg.model.grad_checkpointing,)


def candidates(cfg: Config, world_size: int, global_batch: int, device: Device, *, choose_loss: bool, choose_checkpointing: bool, accum_steps: Optional[int] = None) -> Iterable[Plan]:
    """For each loss and checkpointing option, the plan with the largest micro-batch that fits
    (fewest micro-batches: GradCache's extra forward and per-micro-batch overheads are least)."""
    rows = global_batch // world_size
    micro_batches = [rows // accum_steps] if accum_steps else divisors_descending(rows)
    for loss_impl in loss_options(cfg, choose_loss):
        for checkpointing in checkpointing_options(cfg, choose_checkpointing):
            for micro in micro_batches:
                shape = shape_of(cfg, world_size, micro, rows // micro, device, loss_impl=loss_impl, grad_checkpointing=checkpointing)
                plan = plan_for(cfg, shape, device)
                if plan.fits:
                    yield plan
                    break


class DoesNotFit(ValueError):
    """No shape reaches the global batch in this memory; the message says what is over."""


def choose(cfg: Config, world_size: int, global_batch: int, device: Device, *, choose_loss: bool = True, choose_checkpointing: bool = True, accum_steps: Optional[int] = None) -> Plan:
    """The fitting plan with the fewest hardware FLOPs (checkpointing's and GradCache's second
    forwards cost time; of equal cost, the larger micro-batch)."""
    if global_batch % world_size:
        raise DoesNotFit(f"train.global_batch {global_batch} is not a multiple of the {world_size} ranks")
    if accum_steps and (global_batch // world_size) % accum_steps:
        raise DoesNotFit(f"train.global_batch {global_batch} on {world_size} ranks is not {accum_steps} (train.accum_steps) equal micro-batches per rank")
    plans = list(candidates(cfg, world_size, global_batch, device, choose_loss=choose_loss, choose_checkpointing=choose_checkpointing, accum_steps=accum_steps))
    if not plans:
        raise DoesNotFit(explain_overflow(cfg, world_size, global_batch, device, choose_loss, choose_checkpointing, accum_steps))
    return min(plans, key=lambda plan: (plan.flops_per_rank, -plan.shape.micro_batch))


def explain_overflow(cfg: Config, world_size: int, global_batch: int, device: Device, choose_loss: bool, choose_checkpointing: bool, accum_steps: Optional[int]) -> str:
    """The smallest plan tried (micro-batch 1, or the fixed one; checkpointing and ring where
    allowed): its peak, the memory, and its largest components in the phase that is over."""
    rows = global_batch // world_size
    micro = rows // accum_steps if accum_steps else 1
    loss_impl = "ring" if "ring" in loss_options(cfg, choose_loss) else cfg.loss.impl
    checkpointing = True if choose_checkpointing else cfg.model.grad_checkpointing
    shape = shape_of(cfg, world_size, micro, rows // micro, device, loss_impl=loss_impl, grad_checkpointing=checkpointing)
    plan = plan_for(cfg, shape, device)
    over = plan.budget.peak - device.memory_bytes
    largest = sorted(plan.budget.components.items(), key=lambda item: -item[1])[:3]
    parts = ", ".join(f"{name} {value / GIB:.1f} GiB" for name, value in largest)
    return (
        f"global batch {global_batch} on {world_size} rank(s) does not fit in {device.memory_bytes / GIB:.1f} GiB per rank: even with "
        f"micro-batch {micro} × {rows // micro}, {loss_impl} loss, checkpointing {'on' if checkpointing else 'off'}, its {plan.budget.peak_phase} "
        f"peak is {plan.budget.peak / GIB:.1f} GiB, over by {over / GIB:.1f} GiB; largest: {parts}"
    )


def largest_global_batch(cfg: Config, world_size: int, device: Device, plan: Plan, limit: int = 1 << 40) -> int:
    """The largest global batch that fits with ``plan``'s micro-batch, loss and checkpointing, by
    accumulating more micro-batches (what grows with it: the caches, the loss's O(B) partials, and
    for gather its [b, B] logits). A multiple of world size × micro-batch."""
    step = world_size * plan.shape.micro_batch

    def fits(accum: int) -> bool:
        return plan_for(cfg, replace(plan.shape, accum_steps=accum), device).fits

    low, high = 1, 2
    while high * step <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * step
