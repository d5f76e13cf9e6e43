"""clipdist CLIP (ViT or ModifiedResNet) -> OpenCLIP: a state dict in open_clip's ``CLIP`` key
layout (OpenAI's names, 0-dim logit scale) and the model config JSON that builds that model.

open_clip registers a config file under its file name, so ``OUT.pt`` comes with ``OUT.json``:

    open_clip.add_model_config("OUT.json")
    model, _, preprocess = open_clip.create_model_and_transforms("OUT", pretrained="OUT.pt")

When the architecture is one of open_clip's built-in OpenAI models, its name (e.g.
``ViT-B-32-quickgelu``) works without the JSON.

Beside them goes ``OUT/``, open_clip's ``local-dir`` layout (``open_clip_config.json`` holding
``model_cfg`` and ``preprocess_cfg``, and the same weights file under open_clip's name), which
tools that take an open_clip model name load with no code:

    open_clip.create_model_and_transforms("local-dir:OUT")
    clip_benchmark eval --model local-dir:OUT --pretrained '' --dataset wds/NAME --dataset_root ROOT

The config's ``quick_gelu`` is model.act. open_clip names the built-in configs of OpenAI's
architectures ``NAME-quickgelu`` (QuickGELU, OpenAI's weights) and ``NAME`` (exact GELU, as most
LAION and DataComp weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from clipdist.config import ModelConfig
from clipdist.data.transforms import CLIP_MEAN, CLIP_STD
from clipdist.export.run import ExportError
from clipdist.fileio import link_or_copy, write_text_atomically
from clipdist.models.clip import openai_state_dict
from clipdist.models.pretrained import OPEN_CLIP_DIR_CONFIG

# open_clip's defaults (CLIPVisionCfg), left out of its JSON files unless they differ.
_OPEN_CLIP_HEAD_WIDTH = 64
_OPEN_CLIP_MLP_RATIO = 4.0


def _openai_architecture(embed_dim: int, image_size: int, layers: Any, width: int, patch_size: Optional[int], text_width: int, text_heads: int) -> Dict[str, Any]:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_heads, "layers": 12},
    }


_OPENAI_ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "RN50": _openai_architecture(1024, 224, [3, 4, 6, 3], 64, None, 512, 8),
    "RN101": _openai_architecture(512, 224, [3, 4, 23, 3], 64, None, 512, 8),
    "RN50x4": _openai_architecture(640, 288, [4, 6, 10, 6], 80, None, 640, 10),
    "RN50x16": _openai_architecture(768, 384, [6, 8, 18, 8], 96, None, 768, 12),
    "RN50x64": _openai_architecture(1024, 448, [3, 15, 36, 10], 128, None, 1024, 16),
    "ViT-B-32": _openai_architecture(512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16": _openai_architecture(512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14": _openai_architecture(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336": _openai_architecture(768, 336, 24, 1024, 14, 768, 12),
}
# open_clip's built-in configs of OpenAI's released architectures, as in its model_configs/*.json
# (tests/test_export.py checks each against the installed open_clip): NAME-quickgelu says
# "quick_gelu": true; NAME (exact GELU) leaves the key out.
BUILTIN_CONFIGS: Dict[str, Dict[str, Any]] = {
    **{f"{name}-quickgelu": {**config, "quick_gelu": True} for name, config in _OPENAI_ARCHITECTURES.items()},
    **_OPENAI_ARCHITECTURES,
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
        "quick_gelu": cfg.act == "quick_gelu",  # written either way: a reader need not know open_clip's default
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width, "heads": text.heads, "layers": text.layers},
    }
    if cfg.init_logit_bias is not None:  # SigLIP: open_clip's CLIP then has a logit_bias parameter
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg


def builtin_name(model_cfg: Mapping[str, Any]) -> Optional[str]:
    """open_clip's name for this architecture when it is a built-in one."""
    return next((name for name, builtin in BUILTIN_CONFIGS.items() if _with_quick_gelu(builtin) == _with_quick_gelu(model_cfg)), None)


def _with_quick_gelu(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``model_cfg`` with its quick_gelu flag written out (absent means false, as open_clip reads it)."""
    return {**model_cfg, "quick_gelu": bool(model_cfg.get("quick_gelu", False))}


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


# What open_clip's local-dir loader reads (open_clip/factory.py, constants.py): the config file,
# and the weights under the names it prefers and its push_to_hf_hub writes.
LOCAL_DIR_WEIGHTS = {
    ".safetensors": "open_clip_model.safetensors",
    **dict.fromkeys((".pt", ".pth", ".bin"), "open_clip_pytorch_model.bin"),  # torch.save files
}


def local_dir_path(out_path: Path) -> Path:
    """The local-dir folder written beside the weights file ``out_path``: its name without suffix."""
    if out_path.suffix not in LOCAL_DIR_WEIGHTS:
        raise ExportError(f"{out_path}: the weights file needs another suffix (.pt, .safetensors), or .pth/.bin; the config goes beside it as .json, open_clip's local-dir folder as {out_path.with_suffix('')}/")
    return out_path.with_suffix("")


def open_clip_preprocess_cfg(cfg: ModelConfig) -> Dict[str, Any]:
    """open_clip's ``preprocess_cfg`` of clipdist's evaluation preprocessing (clip_preprocess:
    bicubic resize of the shortest side, centre crop, CLIP mean and std)."""
    return {"size": cfg.vision.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic", "resize_mode": "shortest"}


def write_open_clip_local_dir(out_path: Path, cfg: ModelConfig) -> Path:
    """open_clip's local-dir folder for the weights file ``out_path`` (written by
    export_open_clip): the config, and the same weights file (a hard link where possible, so a
    large model is not stored twice). Returns the folder."""
    local_dir = local_dir_path(out_path)
    local_dir.mkdir(parents=True, exist_ok=True)
    link_or_copy(out_path, local_dir / LOCAL_DIR_WEIGHTS[out_path.suffix])
    config = {"model_cfg": open_clip_model_cfg(cfg), "preprocess_cfg": open_clip_preprocess_cfg(cfg)}
    write_text_atomically(local_dir / OPEN_CLIP_DIR_CONFIG, json.dumps(config, indent=2) + "\n")
    return local_dir
