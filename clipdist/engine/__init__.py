"""Everything DeepSpeed: wrapping, optimizer groups, schedules, checkpoints, exact accumulation."""

from clipdist.engine.checkpoint import Checkpointer, TrainState, needs_universal_load
from clipdist.engine.deepspeed_engine import build_engine, deepspeed_config, effective_precision, input_dtype, select_accelerator
from clipdist.engine.grad_cache import accumulate_gradients, accumulation_groups, train_step
from clipdist.engine.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine

__all__ = [
    "Checkpointer",
    "TrainState",
    "accumulate_gradients",
    "accumulation_groups",
    "build_engine",
    "build_optimizer",
    "build_scheduler",
    "deepspeed_config",
    "effective_precision",
    "input_dtype",
    "needs_universal_load",
    "param_groups",
    "select_accelerator",
    "train_step",
    "warmup_cosine",
]
