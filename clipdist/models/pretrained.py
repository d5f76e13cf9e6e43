"""Start from released weights: ``model.pretrained=PATH`` loads an OpenAI or OpenCLIP checkpoint
file into a clipdist model before training or evaluation.

Accepted files:

- OpenAI's released models (TorchScript archives, as ``clip.load`` downloads them) or their
  plain state dicts (``visual.*``, ``transformer.*``, ``token_embedding.weight`` ...);
- open_clip state dicts, of ``CLIP`` (OpenAI's names) or ``CustomTextCLIP`` (``text.*``, ours),
  also open_clip's training checkpoints (``{"state_dict": {"module.visual...": ...}, ...}``),
  and ``.safetensors`` files;
- state dicts written by ``python -m clipdist.export --to open_clip``.

GELU and QuickGELU weights have the same keys and shapes: loaded into a model of the other
activation they raise no error, and give other embeddings. So the file's activation must be
known, and be model.act; it is known from (``checkpoint_activations``):

- the file itself, when it is an OpenAI TorchScript release: QuickGELU;
- an open_clip model config beside it: ``OUT.json`` beside ``OUT.pt`` (as ``clipdist.export``
  writes, and open_clip's ``add_model_config`` reads) or ``open_clip_config.json`` in its
  directory (open_clip's ``local-dir:`` and Hugging Face hub layout): its ``quick_gelu`` flag;
- ``model.pretrained_arch``, the weights' open_clip model name: QuickGELU exactly when it ends in
  ``-quickgelu``, open_clip's naming (``ViT-B-32`` is GELU, ``ViT-B-32-quickgelu`` QuickGELU).

Anything else is refused in one line naming the keys to set. model.act itself states nothing
about the file: every recipe sets it (vitb32: quick_gelu), so LAION weights would load silently
wrong with +experiment=vitb32 if it did.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch

from clipdist.models.clip import CLIP, load_openai_state_dict

# Keys under which training scripts nest the weights ({"state_dict": ...} in open_clip).
_WRAPPER_KEYS = ("state_dict", "model", "module")
# Prefixes that wrappers add to every key (DistributedDataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# open_clip marks its QuickGELU model configs so (ViT-B-32-quickgelu; tests/test_import.py checks
# every built-in config that clipdist's towers can build).
OPEN_CLIP_QUICKGELU_SUFFIX = "-quickgelu"
# open_clip's local-dir / HF hub layout: {"model_cfg": ..., "preprocess_cfg": ...} beside the weights.
OPEN_CLIP_DIR_CONFIG = "open_clip_config.json"
_ACT_NAMES = {"quick_gelu": "QuickGELU", "gelu": "GELU"}


def load_pretrained(model: CLIP, path: str, arch: Optional[str] = None) -> None:
    """Load the weights in ``path`` into ``model``; ``arch`` is model.pretrained_arch. Raises
    ValueError (one line, naming the file and what to set) when their activation is not known or
    is not the model's, or when they do not fit (the first missing, unexpected or mis-shaped key)."""
    state_dict = read_state_dict(path)  # first: a file that holds no weights is told so
    problem = activation_problem(path, arch, model.act)
    if problem:
        raise ValueError(f"model.pretrained={path}: {problem}")
    try:
        load_openai_state_dict(model, state_dict)
    except ValueError as error:
        raise ValueError(f"model.pretrained={path}: {error}; is the model config the checkpoint's architecture?") from None


def activation_problem(path: str, arch: Optional[str], act: str) -> Optional[str]:
    """Why the weights in ``path`` cannot start a model.act=``act`` model (one line, saying
    which keys to set), or None when they can."""
    stated = checkpoint_activations(Path(path), arch)
    if not stated:
        return (
            "a state dict does not say whether its weights were trained with GELU or QuickGELU (same keys and shapes): "
            "name their open_clip model, e.g. model.pretrained_arch=ViT-B-32 model.act=gelu (open_clip's LAION-2B, DataComp weights) "
            "or model.pretrained_arch=ViT-B-32-quickgelu model.act=quick_gelu (OpenAI's, MetaCLIP's)"
        )
    if len(set(stated.values())) > 1:
        return "its activation is stated differently: " + ", ".join(f"{source} says {_ACT_NAMES[a]}" for source, a in stated.items())
    source, weights_act = next(iter(stated.items()))
    if weights_act != act:
        return f"its weights are {_ACT_NAMES[weights_act]} ({source}), but model.act={act}: set model.act={weights_act}"
    return None


def checkpoint_activations(file: Path, arch: Optional[str]) -> Dict[str, str]:
    """What states the activation of the weights in ``file``: {the statement, in words: model.act}."""
    stated = {}
    if file.is_file() and is_torchscript(file):
        stated["an OpenAI TorchScript release"] = "quick_gelu"
    for config_path, model_cfg in open_clip_configs_beside(file):
        stated[f"{config_path.name} beside it"] = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"  # absent: GELU, as open_clip reads it
    if arch:
        stated[f"model.pretrained_arch={arch}"] = "quick_gelu" if arch.endswith(OPEN_CLIP_QUICKGELU_SUFFIX) else "gelu"
    return stated


def open_clip_configs_beside(file: Path) -> Iterator[Tuple[Path, Mapping[str, Any]]]:
    """open_clip model configs that describe ``file``: ``<stem>.json``, and ``model_cfg`` of
    the directory's open_clip_config.json. Other JSON files are no statement and are passed over."""
    own = read_json(file.with_suffix(".json"))
    if isinstance(own, Mapping) and "vision_cfg" in own:
        yield file.with_suffix(".json"), own
    directory = read_json(file.parent / OPEN_CLIP_DIR_CONFIG)
    if isinstance(directory, Mapping) and isinstance(directory.get("model_cfg"), Mapping):
        yield file.parent / OPEN_CLIP_DIR_CONFIG, directory["model_cfg"]


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is absent or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and without wrapper prefixes, on the CPU."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained={path}: no such file")
    if is_torchscript(file):
        # OpenAI's releases are TorchScript; its state_dict() holds the weights (clip.load(jit=False)
        # does the same). torch.jit's deprecation warning is no advice to someone reading a release.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded: Any = torch.jit.load(str(file), map_location="cpu").state_dict()
    elif file.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded = load_file(str(file))
    else:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    return strip_wrappers(loaded, path)


def is_torchscript(file: Path) -> bool:
    """A TorchScript archive is a zip with compiled code beside the weights (``constants.pkl``)."""
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def strip_wrappers(loaded: Any, path: str) -> Dict[str, torch.Tensor]:
    while isinstance(loaded, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if wrapper is None:
            break
        loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"model.pretrained={path}: not a state dict (expected a mapping of names to tensors, found {type(loaded).__name__})")
    state_dict = dict(loaded)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return state_dict
