"""clipdist CLIP (ViT or ModifiedResNet) -> OpenCLIP: a state dict in open_clip's ``CLIP`` key
layout (OpenAI's names, 0-dim logit scale) and the model config JSON that builds that model.

open_clip registers a config file under its file name, so ``OUT.pt`` comes with ``OUT.json``:

    open_clip.add_model_config("OUT.json")
    model, _, preprocess = open_clip.create_model_and_transforms("OUT", pretrained="OUT.pt")

When the architecture is one of open_clip's built-in OpenAI models, its name (e.g.
``ViT-B-32-quickgelu``) works without the JSON. clipdist's towers use QuickGELU, as OpenAI's
released models do, hence the ``-quickgelu`` names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from clipdist.config import ModelConfig
from clipdist.export.run import ExportError
from clipdist.fileio import write_text_atomically
from clipdist.models.clip import openai_state_dict

# open_clip's defaults (CLIPVisionCfg), left out of its JSON files unless they differ.
_OPEN_CLIP_HEAD_WIDTH = 64
_OPEN_CLIP_MLP_RATIO = 4.0


def _openai_architecture(embed_dim: int, image_size: int, layers: Any, width: int, patch_size: Optional[int], text_width: int, text_heads: int) -> Dict[str, Any]:
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_heads, "layers": 12},
    }


# open_clip's built-in configs of OpenAI's released architectures, as in its model_configs/*.json
# (tests/test_export.py checks each against the installed open_clip).
BUILTIN_CONFIGS: Dict[str, Dict[str, Any]] = {
    "RN50-quickgelu": _openai_architecture(1024, 224, [3, 4, 6, 3], 64, None, 512, 8),
    "RN101-quickgelu": _openai_architecture(512, 224, [3, 4, 23, 3], 64, None, 512, 8),
    "RN50x4-quickgelu": _openai_architecture(640, 288, [4, 6, 10, 6], 80, None, 640, 10),
    "RN50x16-quickgelu": _openai_architecture(768, 384, [6, 8, 18, 8], 96, None, 768, 12),
    "RN50x64-quickgelu": _openai_architecture(1024, 448, [3, 15, 36, 10], 128, None, 1024, 16),
    "ViT-B-32-quickgelu": _openai_architecture(512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16-quickgelu": _openai_architecture(512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14-quickgelu": _openai_architecture(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336-quickgelu": _openai_architecture(768, 336, 24, 1024, 14, 768, 12),
}


def open_clip_model_cfg(cfg: ModelConfig) -> Dict[str, Any]:
    """open_clip's ``model_cfg`` (the JSON of its model_configs/) for this architecture."""
    vision = cfg.vision
    resnet = vision.arch == "resnet"
    vision_cfg: Dict[str, Any] = {
        "image_size": vision.image_size,
        "layers": list(vision.stage_blocks) if resnet else vision.layers,
        "width": vision.width,
        "patch_size": None if resnet else vision.patch_size,
    }
    if vision.head_width != _OPEN_CLIP_HEAD_WIDTH:
        vision_cfg["head_width"] = vision.head_width
    if not resnet and vision.mlp_ratio != _OPEN_CLIP_MLP_RATIO:
        vision_cfg["mlp_ratio"] = vision.mlp_ratio
    text = cfg.text
    model_cfg: Dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": True,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width, "heads": text.heads, "layers": text.layers},
    }
    if cfg.init_logit_bias is not None:  # SigLIP: open_clip's CLIP then has a logit_bias parameter
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg


def builtin_name(model_cfg: Mapping[str, Any]) -> Optional[str]:
    """open_clip's name for this architecture when it is a built-in one."""
    return next((name for name, builtin in BUILTIN_CONFIGS.items() if builtin == model_cfg), None)


def export_open_clip(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out_path: Path) -> Tuple[Path, Optional[str]]:
    """Write the weights to ``out_path`` (.pt, or .safetensors) and the model config beside it
    (same name, .json). Returns (config path, built-in open_clip name or None)."""
    if out_path.suffix == ".json":
        raise ExportError(f"{out_path}: the weights file needs another suffix (.pt, .safetensors); the config is written beside it as .json")
    weights = {k: v.detach().float().contiguous().clone() for k, v in openai_state_dict(state_dict).items()}
    model_cfg = open_clip_model_cfg(cfg)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(out_path))
    else:
        torch.save(weights, out_path)
    config_path = out_path.with_suffix(".json")
    write_text_atomically(config_path, json.dumps(model_cfg, indent=2) + "\n")
    return config_path, builtin_name(model_cfg)
