"""model.pretrained: OpenAI / OpenCLIP checkpoint files load into clipdist models. The references
are models built by open_clip itself from tiny configs (random init, no download), saved in each
file format a user meets; clipdist then computes the same embeddings (float32, atol 1e-5).

Activation: open_clip's real ViT-B-32 (exact GELU) and ViT-B-32-quickgelu, random weights, load
with the activation their name states, and round-trip through --to open_clip and --to hf; a
state dict whose activation nobody states is refused in one line."""

from __future__ import annotations

import copy
import json
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

from clipdist.config import ACTIVATIONS, ConfigError, ModelConfig, load_config, validate
from clipdist.evaluate import main as evaluate_main
from clipdist.export import builtin_name, export_open_clip, open_clip_model_cfg
from clipdist.export.hf import export_hf
from clipdist.models import build_model, load_pretrained, tokenize
from clipdist.models.pretrained import activation_problem, checkpoint_activations
from test_export import CAPTIONS, ROOT, SIGLIP_VIT, features
from test_models import TINY_RESNET, TINY_VIT, perturb_, random_tokens

open_clip = pytest.importorskip("open_clip", reason="open_clip (test extra) is the independent reference; it does not import here")

# open_clip model configs (its model_configs/*.json format) written by hand for the tiny test
# models of tests/test_models.py, so open_clip builds them without any clipdist code. QuickGELU,
# so named as open_clip names such configs (model.pretrained_arch states the activation so).
_TINY_TEXT_CFG = {"context_length": 12, "vocab_size": 100, "width": 24, "heads": 2, "layers": 2}
OPEN_CLIP_CFGS = {
    "vit": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}, "text_cfg": _TINY_TEXT_CFG},
    "resnet": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8, "patch_size": None, "head_width": 16}, "text_cfg": _TINY_TEXT_CFG},
}


def open_clip_model(arch: str, tmp_path: Path, **kwargs):
    """A randomly initialised open_clip model of a tiny registered config, moved off its init."""
    name = open_clip_name(arch)
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(OPEN_CLIP_CFGS[arch]))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, **kwargs).eval()
    perturb_(model)
    return model


def open_clip_name(arch: str) -> str:
    return f"clipdist-test-{arch}-quickgelu"


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
    # OpenAI's TorchScript releases are QuickGELU; a state dict's activation is stated by its open_clip name.
    load_pretrained(model, str(path), None if write is save_torchscript else open_clip_name(arch))

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
    load_pretrained(model, str(path), open_clip_name("vit"))
    assert model.logit_bias.item() == -10.0


def test_architecture_mismatch_is_one_line_naming_the_first_key(tmp_path):
    path = save_plain(open_clip_model("resnet", tmp_path), tmp_path / "rn.pt")
    with pytest.raises(ValueError) as error:
        load_pretrained(build_model(TINY_VIT), str(path), open_clip_name("resnet"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"model.pretrained={path}: state dict does not fit the model: shape of visual.conv1.weight: checkpoint [4, 3, 3, 3], model [32, 3, 8, 8] (and ")

    vit_path = save_plain(open_clip_model("vit", tmp_path), tmp_path / "vit.pt")
    longer_context = copy.deepcopy(TINY_VIT)
    longer_context.text.context_length = 16
    with pytest.raises(ValueError, match=r"vit\.pt: state dict does not fit the model: shape of text\.positional_embedding: checkpoint \[12, 24\], model \[16, 24\];"):
        load_pretrained(build_model(longer_context), str(vit_path), open_clip_name("vit"))


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



# ---------------------------------------------------------------------------------------------
# Activation: GELU and QuickGELU weights have the same keys and shapes.

VIT_B_32 = {"gelu": "ViT-B-32", "quick_gelu": "ViT-B-32-quickgelu"}  # model.act -> open_clip's name


@pytest.fixture(scope="module")
def vit_b_32(tmp_path_factory):
    """open_clip's ViT-B-32 and ViT-B-32-quickgelu from one seed hold the same weights (an
    activation has none; were they not the same, one of the two imports of the one file would
    fail): one state dict file, and each model's embeddings of 2 images and 2 captions.
    Returns (weights file, images, tokens, {model.act: (image, text embeddings)})."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vit_b_32") / "open_clip_model.safetensors"  # as on the Hugging Face hub
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(CAPTIONS[:2])
    embeddings = {}
    for act, name in VIT_B_32.items():
        torch.manual_seed(0)
        reference = open_clip.create_model(name, pretrained=None).eval()
        if not path.exists():
            save_file(reference.state_dict(), str(path))
        embeddings[act] = embed(reference.encode_image, reference.encode_text, images, tokens)
    return path, images, tokens, embeddings


def embed(encode_image, encode_text, images, tokens):
    """Unnormalised image and text embeddings (open_clip's and HF's default; clipdist's with normalize=False)."""
    with torch.no_grad():
        return encode_image(images), encode_text(tokens)


def embed_clipdist(model, images, tokens):
    return embed(partial(model.encode_image, normalize=False), partial(model.encode_text, normalize=False), images, tokens)


def assert_embeddings(actual, expected, what: str) -> None:
    for kind, a, e in zip(("image", "text"), actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=0, msg=f"{what}: {kind} embeddings, float32, atol 1e-5")


@pytest.mark.parametrize("act", list(VIT_B_32))
def test_open_clip_vit_b_32_imports_and_exports_with_its_activation(act, vit_b_32, tmp_path):
    path, images, tokens, reference = vit_b_32
    name, other = VIT_B_32[act], next(a for a in VIT_B_32 if a != act)
    # The same weights through the other activation: what a silent wrong import computes, far
    # outside the tolerance (measured: 0.028 image, 0.050 text, on these random weights).
    for kind, ours, theirs in zip(("image", "text"), reference[act], reference[other]):
        assert (ours - theirs).abs().max() > 1e-4, f"{kind}: GELU and QuickGELU agree; the test could not tell them apart"

    cfg, _ = load_config(["model=vitb32", f"model.act={act}", f"model.pretrained={path}", f"model.pretrained_arch={name}"])
    validate(cfg, world_size=1, check_data=False)
    model = build_model(cfg.model).eval()
    load_pretrained(model, cfg.model.pretrained, cfg.model.pretrained_arch)
    assert_embeddings(embed_clipdist(model, images, tokens), reference[act], f"clipdist model.act={act} vs open_clip {name}")
    assert activation_problem(str(path), name, other).endswith(f"(model.pretrained_arch={name}), but model.act={other}: set model.act={act}")

    # --to open_clip: the JSON's quick_gelu is model.act, and open_clip computes open_clip's embeddings again.
    out = tmp_path / f"vit_b_32_{act}.safetensors"  # open_clip reads it a second faster than a .pt
    config_path, builtin = export_open_clip(model.state_dict(), cfg.model, out)
    assert json.loads(config_path.read_text())["quick_gelu"] is (act == "quick_gelu") and builtin == name
    open_clip.add_model_config(config_path)
    exported = open_clip.create_model(config_path.stem, pretrained=str(out)).eval()
    assert exported.transformer.resblocks[0].mlp.gelu.__class__.__name__ == {"gelu": "GELU", "quick_gelu": "QuickGELU"}[act]
    assert_embeddings(embed(exported.encode_image, exported.encode_text, images, tokens), reference[act], f"--to open_clip, loaded by open_clip as {name}")
    # ... and back into clipdist: the JSON beside the export states the activation (loading the
    # weights again is test_open_clip_checkpoint_gives_open_clip_embeddings' business).
    assert checkpoint_activations(out, None) == {f"{config_path.name} beside it": act}
    assert activation_problem(str(out), None, act) is None


def test_hf_export_of_a_gelu_model_computes_its_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the reference for --to hf; it does not import here")
    cfg = load_config(["model=vit_tiny", "model.act=gelu"])[0].model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    perturb_(model)
    export_hf(model.state_dict(), cfg, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.text_config.hidden_act == hf.config.vision_config.hidden_act == "gelu"

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(CAPTIONS[:2], context_length=cfg.text.context_length)
    ours = embed_clipdist(model, images, tokens)
    hf_embeddings = embed(lambda x: features(hf.get_image_features(pixel_values=x)), lambda t: features(hf.get_text_features(input_ids=t)), images, tokens)
    assert_embeddings(hf_embeddings, ours, "--to hf of a model.act=gelu model")
    # QuickGELU on the same weights (what hidden_act=quick_gelu would compute) is far outside that.
    quick = build_model(ModelConfig(**{**cfg.__dict__, "act": "quick_gelu"})).eval()
    quick.load_state_dict(model.state_dict())
    for kind, a, b in zip(("image", "text"), embed_clipdist(quick, images, tokens), ours):
        assert (a - b).abs().max() > 1e-4, f"{kind}: GELU and QuickGELU agree; the test could not tell them apart"


def test_open_clip_names_quickgelu_configs_by_their_suffix():
    """model.pretrained_arch's rule (-quickgelu: QuickGELU) holds for every open_clip built-in
    config with clipdist's towers (no timm / Hugging Face tower, no CoCa decoder)."""
    checked = 0
    for path in sorted((Path(open_clip.__file__).parent / "model_configs").glob("*.json")):  # not the ones tests register
        name, config = path.stem, json.loads(path.read_text())
        if "timm_model_name" in config["vision_cfg"] or "hf_model_name" in config["text_cfg"] or "multimodal_cfg" in config:
            continue
        expected = "quick_gelu" if config.get("quick_gelu", False) else "gelu"
        assert checkpoint_activations(Path("absent.pt"), name) == {f"model.pretrained_arch={name}": expected}, name
        checked += 1
    assert checked >= 20, f"only {checked} configs checked"


def test_unstated_or_contradicting_activation_is_refused_in_one_line(tmp_path, capsys):
    path = save_plain(open_clip_model("vit", tmp_path), tmp_path / "weights.pt")
    unstated = (
        "a state dict does not say whether its weights were trained with GELU or QuickGELU (same keys and shapes): "
        "name their open_clip model, e.g. model.pretrained_arch=ViT-B-32 model.act=gelu (open_clip's LAION-2B, DataComp weights) "
        "or model.pretrained_arch=ViT-B-32-quickgelu model.act=quick_gelu (OpenAI's, MetaCLIP's)"
    )
    # The entry points refuse before any process group, with the config keys that settle it.
    capsys.readouterr()  # only the entry point's own output below (not open_clip's warnings above)
    assert evaluate_main(["+experiment=tiny", f"model.pretrained={path}"]) == 2
    assert capsys.readouterr().err == f"clipdist: config error: model.pretrained: {path}: {unstated}\n"
    assert evaluate_main(["+experiment=tiny", f"model.pretrained={path}", "model.pretrained_arch=ViT-B-32"]) == 2
    assert capsys.readouterr().err == (
        f"clipdist: config error: model.pretrained: {path}: its weights are GELU (model.pretrained_arch=ViT-B-32), but model.act=quick_gelu: set model.act=gelu\n"
    )
    with pytest.raises(ValueError) as error:
        load_pretrained(build_model(TINY_VIT), str(path))
    assert str(error.value) == f"model.pretrained={path}: {unstated}"

    # open_clip's local-dir / HF hub layout states it too; absent quick_gelu is GELU, as open_clip reads it.
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {k: v for k, v in OPEN_CLIP_CFGS["vit"].items() if k != "quick_gelu"}}))
    with pytest.raises(ValueError, match=r": its activation is stated differently: open_clip_config\.json beside it says GELU, model\.pretrained_arch=clipdist-test-vit-quickgelu says QuickGELU$"):
        load_pretrained(build_model(TINY_VIT), str(path), open_clip_name("vit"))

    with pytest.raises(ConfigError, match=r"^model\.act: expected one of \['quick_gelu', 'gelu'\], got 'relu'$"):
        validate(load_config(["+experiment=tiny", "model.act=relu"])[0], world_size=1, check_data=False)


def test_every_model_config_states_its_activation():
    """conf/model/*.yaml set model.act themselves (not the dataclass default); the recipes of
    OpenAI's architectures are QuickGELU, as OpenAI's released models."""
    import yaml

    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert yaml.safe_load(path.read_text()).get("act") in ACTIVATIONS, f"{path.name}: no model.act"
        model_cfg = load_config([f"model={path.stem}"])[0].model
        name = builtin_name(open_clip_model_cfg(model_cfg))
        assert name is None or name.endswith("-quickgelu"), f"{path.name}: OpenAI's architecture, but model.act={model_cfg.act}"
