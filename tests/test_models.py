"""CLIP towers: parameter counts against OpenAI's published models, equivalence with open_clip's
independent implementation, gradient checkpointing, pooling and the output contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from clipdist.config import ModelConfig, TextConfig, VisionConfig
from clipdist.models import CLIP, build_model, load_openai_state_dict

# Published OpenAI CLIP architectures (model card / open_clip model configs).
PUBLISHED = {
    "RN50": (ModelConfig(name="RN50", embed_dim=1024, vision=VisionConfig(arch="resnet", image_size=224, width=64, stage_blocks=[3, 4, 6, 3]), text=TextConfig(width=512, heads=8, layers=12)), 102_007_137),
    "RN101": (ModelConfig(name="RN101", embed_dim=512, vision=VisionConfig(arch="resnet", image_size=224, width=64, stage_blocks=[3, 4, 23, 3]), text=TextConfig(width=512, heads=8, layers=12)), 119_688_033),
    "RN50x4": (ModelConfig(name="RN50x4", embed_dim=640, vision=VisionConfig(arch="resnet", image_size=288, width=80, stage_blocks=[4, 6, 10, 6]), text=TextConfig(width=640, heads=10, layers=12)), 178_300_601),
    "ViT-B-32": (ModelConfig(name="ViT-B-32", embed_dim=512, vision=VisionConfig(arch="vit", width=768, layers=12, patch_size=32), text=TextConfig(width=512, heads=8, layers=12)), 151_277_313),
    "ViT-L-14": (ModelConfig(name="ViT-L-14", embed_dim=768, vision=VisionConfig(arch="vit", width=1024, layers=24, patch_size=14), text=TextConfig(width=768, heads=12, layers=12)), 427_616_513),
}

TINY_TEXT = TextConfig(context_length=12, vocab_size=100, width=24, heads=2, layers=2)
TINY_VIT = ModelConfig(name="tiny-vit", embed_dim=16, vision=VisionConfig(arch="vit", image_size=32, width=32, layers=2, patch_size=8, head_width=16), text=TINY_TEXT)
# 64 px: the final feature map is 2x2, so the attention pool attends over 5 tokens.
TINY_RESNET = ModelConfig(name="tiny-rn", embed_dim=16, vision=VisionConfig(arch="resnet", image_size=64, width=8, stage_blocks=[1, 2, 1, 1], head_width=16), text=TINY_TEXT)


def random_tokens(batch: int, cfg: TextConfig, generator: torch.Generator) -> torch.Tensor:
    """SOT/EOT-framed rows of random length; EOT (the largest id) is followed by 0 padding."""
    sot, eot = cfg.vocab_size - 2, cfg.vocab_size - 1
    tokens = torch.zeros(batch, cfg.context_length, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(1, cfg.context_length - 1, (1,), generator=generator))
        tokens[row, 0] = sot
        tokens[row, 1 : length + 1] = torch.randint(1, cfg.vocab_size - 2, (length,), generator=generator)
        tokens[row, length + 1] = eot
    return tokens


def perturb_(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its init: zero-initialised bn3 weights would otherwise make the
    ResNet branches the identity and hide mistakes in them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_param_count_matches_openai(name):
    open_clip = pytest.importorskip("open_clip")
    cfg, published = PUBLISHED[name]
    with torch.device("meta"):
        model = build_model(cfg)
        reference = open_clip.create_model(name, device="meta")
    reference_count = sum(p.numel() for p in reference.parameters())
    assert model.num_params() == published == reference_count, f"{name}: ours {model.num_params():,}, published {published:,}, open_clip {reference_count:,} (exact)"


def test_output_contract():
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    images = torch.randn(3, 3, 32, 32)
    tokens = random_tokens(3, TINY_TEXT, torch.Generator().manual_seed(0))
    image_emb, text_emb, logit_scale = model(images, tokens)
    assert image_emb.shape == text_emb.shape == (3, 16)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3), msg="image embeddings are unit norm (float32 default tol)")
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3), msg="text embeddings are unit norm (float32 default tol)")
    assert model.logit_scale.shape == (1,) and logit_scale.shape == (1,)
    assert logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6), "init temperature is 1/0.07 (CLIP paper)"

    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert model(images, tokens)[2].item() == pytest.approx(100.0), "exp(logit_scale) clamps at max_logit_scale"


def test_siglip_model_adds_a_learnable_bias_to_its_outputs():
    cfg = copy.deepcopy(TINY_VIT)
    cfg.init_logit_scale, cfg.init_logit_bias = math.log(10.0), -10.0
    images, tokens = torch.randn(2, 3, 32, 32), random_tokens(2, TINY_TEXT, torch.Generator().manual_seed(0))
    model = build_model(cfg)
    outputs = model(images, tokens)
    assert len(outputs) == 4 and model.logit_bias.shape == (1,)
    assert outputs[2].item() == pytest.approx(10.0) and outputs[3].item() == -10.0, "SigLIP init: scale 10, bias -10"
    assert "logit_bias" in model.no_weight_decay()
    softmax_model = build_model(TINY_VIT)
    assert softmax_model.logit_bias is None and len(softmax_model(images, tokens)) == 3


def test_eot_pooling_ignores_tokens_after_eot():
    """Causal mask + EOT pooling: what follows EOT (padding) cannot change the text embedding."""
    torch.manual_seed(0)
    model = build_model(TINY_VIT).double()
    tokens = random_tokens(4, TINY_TEXT, torch.Generator().manual_seed(0))
    eot_position = tokens.argmax(dim=-1)
    noisy = tokens.clone()
    for row, position in enumerate(eot_position.tolist()):
        noisy[row, position + 1 :] = torch.randint(1, TINY_TEXT.vocab_size - 2, (TINY_TEXT.context_length - position - 1,))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(noisy), model.encode_text(tokens), atol=1e-12, rtol=0, msg="float64, atol 1e-12")
        changed = tokens.clone()
        changed[:, 1] = (changed[:, 1] % (TINY_TEXT.vocab_size - 3)) + 1
        assert not torch.allclose(model.encode_text(changed), model.encode_text(tokens)), "tokens before EOT must matter"


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_grad_checkpointing_changes_no_gradient(cfg):
    torch.manual_seed(0)
    plain = build_model(cfg).double()
    perturb_(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, dtype=torch.float64)
    tokens = random_tokens(4, cfg.text, torch.Generator().manual_seed(0))

    def contrastive_loss(model: CLIP) -> torch.Tensor:
        image_emb, text_emb, scale = model(images, tokens)
        logits = scale * image_emb @ text_emb.T
        labels = torch.arange(len(logits))
        return torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)

    contrastive_loss(plain).backward()
    contrastive_loss(checkpointed).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient; the test would be vacuous"
        torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=0, msg=f"{name}: float64, atol 1e-12")
    # BatchNorm running statistics must advance once per step, not once more in the recomputation.
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, atol=1e-12, rtol=0, msg=f"buffer {name}: float64, atol 1e-12")


def test_grad_checkpointing_follows_config():
    model = build_model(ModelConfig(**{**TINY_VIT.__dict__, "grad_checkpointing": True}))
    assert model.visual.transformer.grad_checkpointing and model.text.transformer.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.visual.transformer.grad_checkpointing and not model.text.transformer.grad_checkpointing


def open_clip_reference(cfg: ModelConfig):
    model_module = pytest.importorskip("open_clip.model")
    vision = cfg.vision
    layers = tuple(vision.stage_blocks) if vision.arch == "resnet" else vision.layers
    vision_cfg = model_module.CLIPVisionCfg(layers=layers, width=vision.width, head_width=vision.head_width, patch_size=vision.patch_size, image_size=vision.image_size)
    text_cfg = model_module.CLIPTextCfg(context_length=cfg.text.context_length, vocab_size=cfg.text.vocab_size, width=cfg.text.width, heads=cfg.text.heads, layers=cfg.text.layers)
    return model_module.CLIP(cfg.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=cfg.act == "quick_gelu")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_matches_open_clip(cfg, act):
    """open_clip is an independent implementation of the same architecture; its weights load
    through load_openai_state_dict and both give the same embeddings (float32, atol 1e-5), with
    either activation (open_clip's quick_gelu flag, our model.act)."""
    cfg = ModelConfig(**{**cfg.__dict__, "act": act})
    torch.manual_seed(0)
    reference = open_clip_reference(cfg).eval()
    perturb_(reference)
    model = build_model(cfg).eval()
    load_openai_state_dict(model, reference.state_dict())
    assert model.num_params() == sum(p.numel() for p in reference.parameters())

    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = random_tokens(3, cfg.text, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=False), reference.encode_image(images), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
        torch.testing.assert_close(model.encode_text(tokens, normalize=False), reference.encode_text(tokens), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
    assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_bf16_autocast_close_to_fp32(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = random_tokens(2, cfg.text, torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images, tokens)
    for a, b in zip(low, reference):
        # bf16 keeps ~3 significant digits; unit-norm embeddings agree to a few 1e-2.
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2, msg="bf16 autocast vs fp32, atol/rtol 5e-2")


def test_no_weight_decay_names():
    assert build_model(TINY_VIT).no_weight_decay() == {
        "logit_scale",
        "visual.class_embedding",
        "visual.positional_embedding",
        "text.token_embedding.weight",
        "text.positional_embedding",
    }
    assert "visual.attnpool.positional_embedding" in build_model(TINY_RESNET).no_weight_decay()


def test_bad_input_names_the_expected_shape():
    model = build_model(TINY_VIT)
    with pytest.raises(ValueError, match=r"expected \[batch, 3, 32, 32\]"):
        model.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected \[batch, <= 12\]"):
        model.encode_text(torch.zeros(1, 13, dtype=torch.long))
