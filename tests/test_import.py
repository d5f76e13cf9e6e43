"""model.pretrained: OpenAI / OpenCLIP checkpoint files load into clipdist models. The references
are models built by open_clip itself from tiny configs (random init, no download), saved in each
file format a user meets; clipdist then computes the same embeddings (float32, atol 1e-5)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from clipdist.config import ConfigError, load_config, validate
from clipdist.models import build_model, load_pretrained
from test_export import SIGLIP_VIT
from test_models import TINY_RESNET, TINY_VIT, perturb_, random_tokens

open_clip = pytest.importorskip("open_clip", reason="open_clip (test extra) is the independent reference; it does not import here")

# open_clip model configs (its model_configs/*.json format) written by hand for the tiny test
# models of tests/test_models.py, so open_clip builds them without any clipdist code.
_TINY_TEXT_CFG = {"context_length": 12, "vocab_size": 100, "width": 24, "heads": 2, "layers": 2}
OPEN_CLIP_CFGS = {
    "vit": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}, "text_cfg": _TINY_TEXT_CFG},
    "resnet": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8, "patch_size": None, "head_width": 16}, "text_cfg": _TINY_TEXT_CFG},
}


def open_clip_model(arch: str, tmp_path: Path, **kwargs):
    """A randomly initialised open_clip model of a tiny registered config, moved off its init."""
    name = f"clipdist-test-{arch}"
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(OPEN_CLIP_CFGS[arch]))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, **kwargs).eval()
    perturb_(model)
    return model


# How each kind of file is written. OpenAI's releases are TorchScript archives; open_clip's
# training script saves {"epoch", "name", "state_dict" (DDP "module."-prefixed), "optimizer"}.
def save_plain(model, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def save_open_clip_training_checkpoint(model, path: Path) -> Path:
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def save_torchscript(model, path: Path) -> Path:
    with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def save_safetensors(model, path: Path) -> Path:
    from safetensors.torch import save_file

    path = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


CASES = {
    # id: (clipdist config, open_clip arch, open_clip kwargs, writer)
    "vit-state-dict": (TINY_VIT, "vit", {}, save_plain),
    "resnet-state-dict": (TINY_RESNET, "resnet", {}, save_plain),
    "vit-open-clip-training-checkpoint": (TINY_VIT, "vit", {}, save_open_clip_training_checkpoint),
    "resnet-openai-torchscript": (TINY_RESNET, "resnet", {}, save_torchscript),
    "vit-custom-text-safetensors": (TINY_VIT, "vit", {"force_custom_text": True}, save_safetensors),
    "vit-siglip-bias": (SIGLIP_VIT, "vit", {"init_logit_bias": -10.0}, save_plain),
}


@pytest.mark.parametrize("case", list(CASES))
def test_open_clip_checkpoint_gives_open_clip_embeddings(case, tmp_path):
    cfg, arch, kwargs, write = CASES[case]
    reference = open_clip_model(arch, tmp_path, **kwargs)
    path = write(reference, tmp_path / "weights.pt")
    model = build_model(cfg).eval()
    load_pretrained(model, str(path))

    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    tokens = random_tokens(3, cfg.text, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=False), reference.encode_image(images), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
        torch.testing.assert_close(model.encode_text(tokens, normalize=False), reference.encode_text(tokens), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == reference.logit_scale.item()
    if cfg.init_logit_bias is not None:
        assert model.logit_bias.shape == (1,) and model.logit_bias.item() == reference.logit_bias.item()
    # The reference is off its init (perturbed), so equal outputs cannot come from equal seeds.
    assert not torch.allclose(build_model(cfg).encode_image(images, normalize=False), model.encode_image(images, normalize=False))


def test_siglip_model_keeps_its_configured_bias_when_the_checkpoint_has_none(tmp_path):
    path = save_plain(open_clip_model("vit", tmp_path), tmp_path / "clip.pt")
    model = build_model(SIGLIP_VIT)
    load_pretrained(model, str(path))
    assert model.logit_bias.item() == -10.0


def test_architecture_mismatch_is_one_line_naming_the_first_key(tmp_path):
    path = save_plain(open_clip_model("resnet", tmp_path), tmp_path / "rn.pt")
    with pytest.raises(ValueError) as error:
        load_pretrained(build_model(TINY_VIT), str(path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"model.pretrained={path}: state dict does not fit the model: shape of visual.conv1.weight: checkpoint [4, 3, 3, 3], model [32, 3, 8, 8] (and ")

    vit_path = save_plain(open_clip_model("vit", tmp_path), tmp_path / "vit.pt")
    longer_context = copy.deepcopy(TINY_VIT)
    longer_context.text.context_length = 16
    with pytest.raises(ValueError, match=r"vit\.pt: state dict does not fit the model: shape of text\.positional_embedding: checkpoint \[12, 24\], model \[16, 24\];"):
        load_pretrained(build_model(longer_context), str(vit_path))


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"model\.pretrained=.*list\.pt: not a state dict \(expected a mapping of names to tensors, found list\)"):
        load_pretrained(build_model(TINY_VIT), str(path))


def test_config_names_a_missing_pretrained_file():
    cfg, _ = load_config(["model.pretrained=/nonexistent/weights.pt"])
    assert cfg.model.pretrained == "/nonexistent/weights.pt"
    with pytest.raises(ConfigError, match=r"^model\.pretrained: no such file: /nonexistent/weights\.pt$"):
        validate(cfg, world_size=1, check_data=False)
