"""A training run's model: its architecture from the run's saved config, its weights from a
DeepSpeed checkpoint of any ZeRO stage, as a float32 clipdist model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from clipdist.config import ModelConfig, describe_config_error, load_config
from clipdist.engine.checkpoint import LATEST
from clipdist.models import CLIP, build_model
from clipdist.models.clip import state_dict_mismatch

RUN_INFO = "run_info.json"  # written by the trainer (clipdist.log): the launch and its resolved config
ZERO_0_TO_2_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO_3_MODEL_STATES = "*zero_pp_rank_0_mp_rank_00_model_states.pt"  # one per rank, "bf16_" prefixed in bf16


class ExportError(ValueError):
    """The run cannot be exported as asked; the message is one line saying why."""


def load_run_model(run_dir: Path, overrides: Sequence[str] = (), checkpoint: Optional[str] = None) -> Tuple[ModelConfig, CLIP]:
    """The run's model config and its model (float32, eval mode) with the checkpoint's weights."""
    cfg = run_model_config(run_dir, overrides)
    return cfg, model_from_checkpoint(cfg, checkpoint_dir(run_dir, checkpoint))


def run_model_config(run_dir: Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """The model section of the run's resolved config (``<run>/run_info.json``), or, given Hydra
    overrides, of the config they compose (for runs that predate run_info.json)."""
    if overrides:
        return load_config(overrides)[0].model
    info_path = run_dir / RUN_INFO
    if not info_path.is_file():
        raise ExportError(f"{info_path} not found: pass the run's Hydra overrides instead, e.g. --override +experiment=digits")
    try:
        model_section = json.loads(info_path.read_text())["config"]["model"]
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{info_path}: no config.model ({type(error).__name__}: {error})") from None
    return model_config_from_dict(model_section, str(info_path))


def model_config_from_dict(values: dict, source: str) -> ModelConfig:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))
    except Exception as error:  # OmegaConf raises several types; all mean a config this version cannot read
        raise ExportError(f"{source}: model config: {describe_config_error(error)}") from None


def checkpoint_dir(run_dir: Path, checkpoint: Optional[str] = None) -> Path:
    """``checkpoint`` (a directory, or a tag such as step_00000150 under <run>/checkpoints), or
    the run's latest complete checkpoint."""
    checkpoints = run_dir / "checkpoints"
    if checkpoint:
        path = Path(checkpoint) if Path(checkpoint).is_dir() else checkpoints / checkpoint
        if not path.is_dir():
            raise ExportError(f"--checkpoint {checkpoint}: neither a directory nor a tag in {checkpoints}")
        return path
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        raise ExportError(f"{run_dir}: no checkpoint ({pointer} is missing)")
    return checkpoints / pointer.read_text().strip()


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

        # It reports progress on stdout and a progress bar on stderr; the export says what it wrote.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    raise ExportError(f"{path}: not a DeepSpeed checkpoint (no {ZERO_0_TO_2_MODEL_STATES} or {ZERO_3_MODEL_STATES})")


def model_from_checkpoint(cfg: ModelConfig, path: Path) -> CLIP:
    state_dict = checkpoint_state_dict(path)
    model = build_model(cfg)
    problem = state_dict_mismatch(model, state_dict)
    if problem:
        raise ExportError(f"{path} does not fit model config {cfg.name!r}: {problem}")
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()
