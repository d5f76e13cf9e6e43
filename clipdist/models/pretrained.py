"""Start from released weights: ``model.pretrained=PATH`` loads an OpenAI or OpenCLIP checkpoint
file into a clipdist model before training or evaluation.

Accepted files:

- OpenAI's released models (TorchScript archives, as ``clip.load`` downloads them) or their
  plain state dicts (``visual.*``, ``transformer.*``, ``token_embedding.weight`` ...);
- open_clip state dicts, of ``CLIP`` (OpenAI's names) or ``CustomTextCLIP`` (``text.*``, ours),
  also open_clip's training checkpoints (``{"state_dict": {"module.visual...": ...}, ...}``),
  and ``.safetensors`` files;
- state dicts written by ``python -m clipdist.export --to open_clip``.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from clipdist.models.clip import CLIP, load_openai_state_dict

# Keys under which training scripts nest the weights ({"state_dict": ...} in open_clip).
_WRAPPER_KEYS = ("state_dict", "model", "module")
# Prefixes that wrappers add to every key (DistributedDataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_pretrained(model: CLIP, path: str) -> None:
    """Load the weights in ``path`` into ``model``. Raises ValueError (one line, naming the
    file and the first missing, unexpected or mis-shaped key) when they do not fit."""
    state_dict = read_state_dict(path)
    try:
        load_openai_state_dict(model, state_dict)
    except ValueError as error:
        raise ValueError(f"model.pretrained={path}: {error}; is the model config the checkpoint's architecture?") from None


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
