"""Tower efficiency: FLIP patch dropout, LiT locking, torch.compile, bf16 towers with a float32
loss, and the multi-tensor AdamW. Engines are real DeepSpeed engines on gloo ranks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from clipdist.config import DeepSpeedConfig, LossConfig, ModelConfig, OptimConfig, load_config
from clipdist.engine import build_optimizer, param_groups
from clipdist.losses import build_loss, clip_loss_reference, siglip_loss_reference
from clipdist.models import build_model
from clipdist.models.vit import PatchDropout
from conftest import run_distributed
from test_models import TINY_RESNET, TINY_VIT, perturb_, random_tokens

# TINY_VIT: 32 px images in 8 px patches = 16 patch tokens + the class token, 2 resblocks.
PATCHES = 16


def variant(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)


def inputs(cfg: ModelConfig, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    return torch.randn(batch, 3, size, size, generator=generator), random_tokens(batch, cfg.text, generator)


def record_transformer_inputs(model) -> list:
    """Shapes of what the image transformer receives, one per forward."""
    shapes: list = []
    model.visual.transformer.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# FLIP patch dropout


@pytest.mark.parametrize("prob, kept", [(0.5, 8), (0.3, 11), (0.99, 1)])
def test_patch_dropout_keeps_the_same_number_of_patches_for_every_image(prob, kept):
    """floor((1 - p) * 16) patches (at least one) plus the class token in training, all 17 at eval."""
    model = build_model(variant(TINY_VIT, patch_dropout=prob))
    shapes = record_transformer_inputs(model)
    images, _ = inputs(TINY_VIT, batch=3)
    assert model.train().encode_image(images).shape == (3, TINY_VIT.embed_dim)
    with torch.no_grad():
        assert model.eval().encode_image(images).shape == (3, TINY_VIT.embed_dim)
    assert shapes == [(3, 1 + kept, 32), (3, 1 + PATCHES, 32)]


def test_patch_dropout_keeps_the_class_token_and_a_uniform_subset_of_patches():
    dropout = PatchDropout(0.5).train()
    rows, width = 2000, 4
    # Token t of every row holds the value t, so a kept token names its own position.
    x = torch.arange(1 + PATCHES, dtype=torch.float32)[None, :, None].expand(rows, -1, width)
    torch.manual_seed(0)
    kept = dropout(x)
    assert kept.shape == (rows, 1 + PATCHES // 2, width)
    assert (kept[:, 0] == 0).all(), "the class token stays first"
    positions = kept[:, 1:, 0].long()
    assert ((positions >= 1) & (positions <= PATCHES)).all()
    assert all(len(set(row)) == PATCHES // 2 for row in positions.tolist()), "no patch kept twice"
    # Each patch is kept with probability 1/2: over 2000 rows its share lies within 0.5 ± 0.05
    # (more than 4 binomial standard deviations, 0.011 each).
    share = torch.bincount(positions.flatten(), minlength=1 + PATCHES)[1:] / rows
    assert ((share - 0.5).abs() < 0.05).all(), share


def test_patch_dropout_is_off_at_eval():
    torch.manual_seed(0)
    plain = build_model(TINY_VIT).eval()
    dropping = build_model(variant(TINY_VIT, patch_dropout=0.5)).eval()
    dropping.load_state_dict(plain.state_dict())  # strict: patch dropout adds no state
    images, _ = inputs(TINY_VIT)
    with torch.no_grad():
        assert torch.equal(dropping.encode_image(images), plain.encode_image(images))


def test_patch_dropout_draws_from_the_global_rng():
    model = build_model(variant(TINY_VIT, patch_dropout=0.5)).train()
    images, _ = inputs(TINY_VIT)

    def embed(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.encode_image(images)

    first, other, again = embed(0), embed(1), embed(0)
    assert torch.equal(first, again), "same seed, same patches"
    assert not torch.allclose(first, other), "another seed drops other patches"


def test_patch_dropout_composes_with_grad_checkpointing():
    """Same seed: checkpointed and plain training see the same patches and get the same
    gradients (float64, atol 1e-12); the recomputation does not redraw them."""
    cfg = variant(TINY_VIT, patch_dropout=0.5)
    torch.manual_seed(0)
    plain = build_model(cfg).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    shapes = record_transformer_inputs(checkpointed)
    images, tokens = inputs(cfg)
    loss_fn = build_loss(LossConfig())
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        losses.append(loss_fn(*model(images.double(), tokens)))
        losses[-1].backward()
    assert shapes == [(4, 1 + PATCHES // 2, 32)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12, abs=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=0, msg=f"{name}: float64, atol 1e-12")


# ---------------------------------------------------------------------------------------------
# LiT locking

LIT_CASES = {
    # name: (model, unlocked blocks, prefixes of the image-tower parameters that stay trainable)
    "vit-0": (TINY_VIT, 0, ()),
    "vit-1": (TINY_VIT, 1, ("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj")),
    "vit-2": (TINY_VIT, 2, ("visual.transformer.resblocks.", "visual.ln_post.", "visual.proj")),
    "resnet-0": (TINY_RESNET, 0, ()),
    "resnet-1": (TINY_RESNET, 1, ("visual.layer4.", "visual.attnpool.")),
    "resnet-2": (TINY_RESNET, 2, ("visual.layer3.", "visual.layer4.", "visual.attnpool.")),
}


def locked(cfg: ModelConfig, unlocked_blocks: int, **changes) -> ModelConfig:
    return variant(cfg, lock_image=True, lock_image_unlocked_blocks=unlocked_blocks, **changes)


@pytest.mark.parametrize("case", list(LIT_CASES))
def test_lit_freezes_exactly_the_locked_parameters(case):
    cfg, unlocked_blocks, unlocked = LIT_CASES[case]
    model = build_model(locked(cfg, unlocked_blocks))
    names = [name for name, _ in model.named_parameters()]
    expected = {name for name in names if not name.startswith("visual.") or name.startswith(unlocked)}
    assert trainable_names(model) == expected
    assert list(model.state_dict()) == list(build_model(cfg).state_dict()), "locking keeps the state dict keys"


def test_lit_rejects_more_unlocked_blocks_than_the_tower_has():
    with pytest.raises(ValueError, match=r"^model.lock_image_unlocked_blocks: the image tower has 2 blocks, got 3$"):
        build_model(locked(TINY_VIT, 3))


def test_lit_keeps_locked_batchnorm_statistics_and_trains_the_rest():
    torch.manual_seed(0)
    model = build_model(locked(TINY_RESNET, 1)).train()
    assert model.training and model.text.training and model.visual.layer4.training and model.visual.attnpool.training
    assert not any(m.training for m in (model.visual.bn1, model.visual.layer1, model.visual.layer3[0].bn2))
    before = {name: b.clone() for name, b in model.named_buffers()}
    model(*inputs(TINY_RESNET))
    moved = {name for name, b in model.named_buffers() if not torch.equal(b, before[name])}
    assert moved == {name for name in before if name.startswith("visual.layer4.")}


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_fully_locked_tower_runs_in_eval_mode_without_a_graph(cfg):
    changes = {"patch_dropout": 0.5} if cfg is TINY_VIT else {}
    model = build_model(locked(cfg, 0, **changes)).train()
    assert not any(m.training for m in model.visual.modules()) and all(m.training for m in model.text.modules())
    before = {name: b.clone() for name, b in model.visual.named_buffers()}
    image_emb, text_emb, _ = model(*inputs(cfg))
    assert not image_emb.requires_grad and text_emb.requires_grad
    assert all(torch.equal(b, before[name]) for name, b in model.visual.named_buffers())


def test_locked_vit_with_unlocked_blocks_still_drops_patches():
    model = build_model(locked(TINY_VIT, 1, patch_dropout=0.5)).train()
    shapes = record_transformer_inputs(model)
    model(*inputs(TINY_VIT))
    assert shapes == [(4, 1 + PATCHES // 2, 32)]


# ---------------------------------------------------------------------------------------------
# Real DeepSpeed engines (2 gloo ranks): LiT optimizer state and updates, bf16 towers


def _engine(model, world_size: int, **ds_changes):
    from clipdist.engine import build_engine

    ds_cfg = DeepSpeedConfig(**ds_changes)
    return build_engine(model, OptimConfig(warmup_steps=1), ds_cfg, local_batch=4, accum_steps=1, world_size=world_size, total_steps=10)


def _one_step(engine, cfg: ModelConfig, rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    images, tokens = inputs(cfg, seed=rank)
    loss = build_loss(LossConfig())(*engine(images.to(dtype), tokens))
    engine.backward(loss)
    engine.step()
    return loss.detach()


def _lit_step(rank: int, world_size: int, cfg: ModelConfig, unlocked_blocks: int, zero_stage: int) -> dict:
    torch.manual_seed(0)
    model = build_model(locked(cfg, unlocked_blocks))
    perturb_(model)  # zero-initialised bn3 weights would leave the rest of a ResNet branch without gradient
    before = {name: t.clone() for name, t in model.state_dict().items()}
    numel = {name: p.numel() for name, p in model.named_parameters()}
    trainable = trainable_names(model)
    engine = _engine(model, world_size, zero_stage=zero_stage)
    _one_step(engine, cfg, rank)
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # under DeepSpeed's wrapper, if any
    after = engine.module.state_dict()
    return {
        "params": set(numel),
        "trainable": trainable,
        "trainable_numel": sum(numel[name] for name in trainable),
        "frozen_numel": sum(n for name, n in numel.items() if name not in trainable),
        "state_numel": sum(state["exp_avg"].numel() for state in torch_optimizer.state.values()),
        "foreach": torch_optimizer.defaults.get("foreach"),
        "changed": {name for name in before if not torch.equal(before[name], after[name])},
    }


def _bf16_step(rank: int, world_size: int) -> dict:
    """A bf16 engine (build_engine directly: train's effective_precision would fall back to fp32
    on a CPU) against the same weights in float32."""
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    images, tokens = inputs(TINY_VIT, seed=rank)
    with torch.no_grad():
        reference = build_loss(LossConfig())(*copy.deepcopy(model)(images, tokens)).item()
    engine = _engine(model, world_size, precision="bf16")
    loss = _one_step(engine, TINY_VIT, rank, torch.bfloat16)
    return {
        "loss_dtype": loss.dtype,
        "loss": loss.item(),
        "reference": reference,
        "param_dtype": next(engine.module.parameters()).dtype,
        "finite_params": all(torch.isfinite(p).all() for p in engine.module.parameters()),
    }


def _engine_cases(rank: int, world_size: int) -> dict:
    return {
        "vit-1-zero0": _lit_step(rank, world_size, TINY_VIT, 1, zero_stage=0),
        "resnet-1-zero2": _lit_step(rank, world_size, TINY_RESNET, 1, zero_stage=2),
        "bf16": _bf16_step(rank, world_size),
    }


@pytest.fixture(scope="module")
def engine_results():
    """Every engine case in one pair of processes: spawning ranks and importing DeepSpeed dominate."""
    return run_distributed(_engine_cases, world_size=2, timeout=300.0)


@pytest.mark.slow
def test_lit_optimizer_state_only_for_trainable_parameters(engine_results):
    unreplicated = engine_results[0]["vit-1-zero0"]  # ZeRO-0: every rank holds all state
    assert unreplicated["state_numel"] == unreplicated["trainable_numel"] < unreplicated["trainable_numel"] + unreplicated["frozen_numel"]
    # ZeRO-2 splits the state over the ranks, padding each rank's flat partition by a few elements.
    partitioned = [rank["resnet-1-zero2"] for rank in engine_results]
    total = sum(rank["state_numel"] for rank in partitioned)
    assert partitioned[0]["trainable_numel"] <= total <= partitioned[0]["trainable_numel"] + 16
    assert all(rank[case]["foreach"] for rank in engine_results for case in ("vit-1-zero0", "resnet-1-zero2"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vit-1-zero0", "resnet-1-zero2"])
def test_lit_step_moves_only_unlocked_weights(engine_results, case):
    for rank in engine_results:
        result = rank[case]
        assert result["changed"] & result["params"] == result["trainable"]
        changed_buffers = result["changed"] - result["params"]
        # Only the unlocked stage's BatchNorm statistics move (the ViT has no buffers).
        assert all(name.startswith("visual.layer4.") for name in changed_buffers)
        assert bool(changed_buffers) == case.startswith("resnet")


@pytest.mark.slow
def test_bf16_engine_scores_the_loss_in_float32(engine_results):
    for rank in engine_results:
        result = rank["bf16"]
        assert result["param_dtype"] == torch.bfloat16 and result["loss_dtype"] == torch.float32
        assert result["finite_params"]
        # bf16 towers (8-bit mantissa) against float32 towers: the loss agrees to 2e-2 relative.
        assert result["loss"] == pytest.approx(result["reference"], rel=2e-2)


# ---------------------------------------------------------------------------------------------
# Losses: float32 scoring of bf16 embeddings


def _loss_inputs(impl: str):
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=-1) for _ in range(2))
    leaves = [image.bfloat16().requires_grad_(), text.bfloat16().requires_grad_(), torch.tensor([14.0], dtype=torch.bfloat16)]
    if impl == "siglip":
        leaves.append(torch.tensor([-2.0], dtype=torch.bfloat16))
    return leaves


@pytest.mark.parametrize("impl", ["gather", "ring", "siglip"])
def test_losses_score_bf16_embeddings_in_float32(impl):
    """On the same bf16 values, the loss matches a float64 reference to float32 precision (rel
    1e-5; bf16 arithmetic would be off by ~1e-2), and gradients return in bf16."""
    leaves = _loss_inputs(impl)
    loss = build_loss(LossConfig(impl=impl, chunk_size=4))(*leaves)
    reference = (siglip_loss_reference if impl == "siglip" else clip_loss_reference)(*(t.detach().double() for t in leaves))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    assert leaves[0].grad.dtype == leaves[1].grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# torch.compile


def _compiled_vs_eager(rank: int, world_size: int) -> dict:
    """A compiled model (gradient checkpointing on) against its eager twin: loss and gradients
    of one batch, then that step through a DeepSpeed engine."""
    cfg = variant(TINY_VIT, grad_checkpointing=True)
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = build_model(variant(cfg, compile=True))
    compiled.load_state_dict(eager.state_dict())  # strict: compiling in place keeps the keys
    images, tokens = inputs(cfg)
    loss_fn = build_loss(LossConfig())
    eager_loss = loss_fn(*eager(images, tokens))
    eager_loss.backward()
    engine = _engine(compiled, world_size)
    before = {name: p.detach().clone() for name, p in compiled.named_parameters()}
    compiled_loss = loss_fn(*engine(images, tokens))
    engine.backward(compiled_loss)
    grads = {name: p.grad.clone() for name, p in compiled.named_parameters()}
    engine.step()
    return {
        "losses": (eager_loss.item(), compiled_loss.item()),
        "grads": {name: (p.grad, grads[name]) for name, p in eager.named_parameters()},
        "moved": all(not torch.equal(p, before[name]) for name, p in compiled.named_parameters()),
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


@pytest.mark.slow
def test_compiled_towers_match_eager_through_a_deepspeed_engine():
    """Inductor reorders float32 sums: loss within 1e-5 relative, each gradient within 1e-4 of
    its parameter's largest entry plus 1e-7 (some gradients are zero up to rounding)."""
    (result,) = run_distributed(_compiled_vs_eager, world_size=1, timeout=400.0)
    eager_loss, compiled_loss = result["losses"]
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert result["graphs"] >= 2, "both towers ran compiled"
    for name, (expected, actual) in result["grads"].items():
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * expected.abs().max().item() + 1e-7, msg=name)
    assert result["moved"]


def test_resnet_checkpointing_traces_under_dynamo():
    """Dynamo and AOTAutograd (the aot_eager backend: inductor's graphs, without code generation)
    trace the checkpointed ResNet; BatchNorm statistics move once per forward, gradients match
    eager (float32: atol 1e-4 of each gradient's largest entry plus 1e-7)."""
    cfg = variant(TINY_RESNET, grad_checkpointing=True)
    torch.manual_seed(0)
    eager = build_model(cfg)
    perturb_(eager)
    traced = copy.deepcopy(eager)
    traced.visual.compile(backend="aot_eager")
    images, tokens = inputs(cfg)
    loss_fn = build_loss(LossConfig())
    for model in (eager, traced):
        loss_fn(*model(images, tokens)).backward()
    for (name, expected), actual in zip(eager.named_parameters(), traced.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=0, atol=1e-4 * expected.grad.abs().max().item() + 1e-7, msg=name)
    for (name, expected), actual in zip(eager.named_buffers(), traced.buffers()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# AdamW kernel


def test_adamw_uses_foreach_on_cpu_and_steps_as_the_plain_loop():
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    twin = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.2)
    multi_tensor = build_optimizer(model, cfg)
    assert multi_tensor.defaults["foreach"] and not multi_tensor.defaults["fused"]
    loop = torch.optim.AdamW(param_groups(twin, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        multi_tensor.step()
        loop.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{name}: float32, atol 1e-6")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused AdamW kernel needs CUDA")
def test_adamw_is_fused_on_cuda():
    assert build_optimizer(build_model(TINY_VIT).cuda(), OptimConfig()).defaults["fused"]


# ---------------------------------------------------------------------------------------------
# Recipes


def test_flip_and_lit_recipes_compose():
    flip, _ = load_config(["+experiment=vitb16_flip"])
    assert (flip.model.name, flip.model.patch_dropout, flip.model.grad_checkpointing) == ("ViT-B-16", 0.5, True)
    lit, _ = load_config(["+experiment=lit_vitb32", "model.pretrained=ViT-B-32.pt"])
    assert (lit.model.name, lit.model.lock_image, lit.model.lock_image_unlocked_blocks) == ("ViT-B-32", True, 0)
