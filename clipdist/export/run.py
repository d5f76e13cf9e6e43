"""A training run's model: its architecture from the run's saved config, its weights from a
DeepSpeed checkpoint of any ZeRO stage (clipdist.engine.checkpoint_weights, which evaluation
reads too), as a float32 clipdist model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

from clipdist.config import ModelConfig, describe_config_error, load_config
from clipdist.engine.checkpoint import LATEST
from clipdist.engine.checkpoint_weights import model_from_checkpoint
from clipdist.models import CLIP

RUN_INFO = "run_info.json"  # written by the trainer (clipdist.log): the launch and its resolved config


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
