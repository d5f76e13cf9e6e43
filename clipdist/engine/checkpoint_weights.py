"""The model in a clipdist (DeepSpeed) checkpoint of any ZeRO stage, as float32 weights: what
``clipdist.export`` converts and ``clipdist.evaluate`` scores, read the same way for both."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Dict

import torch

from clipdist.config import ConfigError, ModelConfig
from clipdist.models import CLIP, build_model
from clipdist.models.clip import state_dict_mismatch

ZERO_0_TO_2_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO_3_MODEL_STATES = "*zero_pp_rank_0_mp_rank_00_model_states.pt"  # one per rank, "bf16_" prefixed in bf16


class CheckpointError(ConfigError):
    """The checkpoint a command names cannot give the configured model; one line says why."""


def checkpoint_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """The module weights and buffers of a DeepSpeed checkpoint directory, in float32.

    ZeRO 0-2 save the whole module in one file (for bf16/fp16 runs, the half-precision weights
    the model computed with); ZeRO-3 saves only partitions, which DeepSpeed's zero_to_fp32
    merges from the fp32 master copies."""
    whole_module = path / ZERO_0_TO_2_MODEL_STATES
    if whole_module.is_file():
        # weights_only=False: DeepSpeed pickles its own bookkeeping beside the weights (its loader
        # does the same); the file is this run's own output. mmap: the optimizer state stays on disk.
        module = torch.load(whole_module, map_location="cpu", weights_only=False, mmap=True)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if any(path.glob(ZERO_3_MODEL_STATES)):
        from clipdist.engine import select_accelerator

        select_accelerator()  # deepspeed picks its accelerator at import
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # It reports progress on stdout and a progress bar on stderr; the caller says what it read.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no {ZERO_0_TO_2_MODEL_STATES} or {ZERO_3_MODEL_STATES})")


def model_from_checkpoint(cfg: ModelConfig, path: Path) -> CLIP:
    """The model ``cfg`` describes (float32, eval mode) with the weights of the checkpoint at
    ``path``; CheckpointError, naming the first key that differs, when they do not fit."""
    state_dict = checkpoint_state_dict(path)
    model = build_model(cfg)
    problem = state_dict_mismatch(model, state_dict)
    if problem:
        raise CheckpointError(f"{path} does not fit model config {cfg.name!r}: {problem}")
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()
