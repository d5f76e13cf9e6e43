"""Engine pieces that need no process group: DeepSpeed config, parameter groups, schedule."""

import math

import pytest

from clipdist.config import DeepSpeedConfig, ModelConfig, TextConfig, VisionConfig
from clipdist.engine import deepspeed_config, param_groups, warmup_cosine
from clipdist.models import build_model


def tiny_model():
    return build_model(
        ModelConfig(
            name="tiny",
            embed_dim=16,
            vision=VisionConfig(arch="vit", image_size=16, width=32, layers=1, patch_size=8, head_width=16),
            text=TextConfig(context_length=8, width=32, heads=2, layers=1),
        )
    )


def test_deepspeed_batch_sizes_agree():
    ds = deepspeed_config(DeepSpeedConfig(zero_stage=2, precision="bf16"), local_batch=64, accum_steps=2, world_size=32)
    assert ds["train_batch_size"] == 64 * 2 * 32 == 4096
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale():
    model = tiny_model()
    decay, no_decay = param_groups(model, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert "logit_scale" in exempt
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert not any("embedding" in n or n.endswith(".bias") or ".ln" in n for n in decayed), decayed


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warmup
    assert lr[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))  # monotone after warmup
