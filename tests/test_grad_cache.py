"""Exact contrastive gradient accumulation (GradCache) through real DeepSpeed engines on 2 gloo
ranks: k micro-batches must give the gradients and the loss of one step with a k× larger batch."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from clipdist.config import (
    ConfigError,
    DeepSpeedConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TextConfig,
    VisionConfig,
    load_config,
    validate,
)
from clipdist.engine import accumulation_groups
from clipdist.losses import build_loss, clip_loss_reference, siglip_loss_reference
from conftest import losses, run_distributed, torchrun

ACCUM_STEPS = 4
MICRO_BATCH = 3  # rows per rank and micro-batch: 4 × 3 rows × 2 ranks = 24 pairs per step
# float32 towers and loss on both sides, which differ only in summation order: a gradient may
# differ from the reference by 1e-5 of the largest entry of its parameter (at least 1e-5).
GRAD_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5

CASES = {
    # name: (ZeRO stage, loss, gradient checkpointing); ZeRO-3 last, as it partitions in place.
    "zero0-gather": (0, "gather", False),
    "zero2-siglip-checkpointing": (2, "siglip", True),
    "zero3-ring": (3, "ring", False),
}


def tiny_vit_config(loss: str, grad_checkpointing: bool) -> ModelConfig:
    return ModelConfig(
        name="tiny",
        embed_dim=16,
        vision=VisionConfig(arch="vit", image_size=16, width=32, layers=1, patch_size=8, head_width=16),
        text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        grad_checkpointing=grad_checkpointing,
        # SigLIP's temperature 10; a bias of -2 rather than -10 so that the negatives weigh in.
        init_logit_scale=2.3 if loss == "siglip" else ModelConfig.init_logit_scale,
        init_logit_bias=-2.0 if loss == "siglip" else None,
    )


def tiny_resnet_config() -> ModelConfig:
    return ModelConfig(
        name="tiny-rn",
        embed_dim=16,
        vision=VisionConfig(arch="resnet", image_size=32, width=8, stage_blocks=[1, 1, 1, 1], head_width=32),
        text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )


def rank_inputs(rank: int, rows: int, image_size: int) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(1000 + rank)
    images = torch.randn(rows, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(1, 64, (rows, 8), generator=generator)
    return SimpleNamespace(images=images, tokens=tokens)


def split(batch: SimpleNamespace, rows: int) -> list[SimpleNamespace]:
    starts = range(0, len(batch.images), rows)
    return [SimpleNamespace(images=batch.images[i : i + rows], tokens=batch.tokens[i : i + rows]) for i in starts]


def full_gradients(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {name: safe_get_full_grad(param).detach().clone() for name, param in engine.module.named_parameters()}


def _accumulated_vs_big_batch(rank: int, world_size: int, zero_stage: int, loss_impl: str, grad_checkpointing: bool) -> dict:
    from clipdist.engine import accumulate_gradients, build_engine
    from clipdist.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_vit_config(loss_impl, grad_checkpointing))
    twin = copy.deepcopy(model)  # before ZeRO-3 partitions `model` in place
    ds_cfg, optim_cfg = DeepSpeedConfig(zero_stage=zero_stage), OptimConfig(warmup_steps=1)
    common = dict(world_size=world_size, total_steps=10)
    accumulating = build_engine(model, optim_cfg, ds_cfg, local_batch=MICRO_BATCH, accum_steps=ACCUM_STEPS, **common)
    big = build_engine(twin, optim_cfg, ds_cfg, local_batch=ACCUM_STEPS * MICRO_BATCH, accum_steps=1, **common)
    loss_fn = build_loss(LossConfig(impl=loss_impl, chunk_size=5))  # tiles narrower than a rank's block

    cpu = torch.device("cpu")
    batch = rank_inputs(rank, ACCUM_STEPS * MICRO_BATCH, image_size=16)
    loss, outputs = accumulate_gradients(accumulating, loss_fn, split(batch, MICRO_BATCH), cpu, torch.float32)
    steps_before_update = accumulating.global_steps
    accumulated = full_gradients(accumulating)
    big_loss, big_outputs = accumulate_gradients(big, loss_fn, [batch], cpu, torch.float32)
    reference = full_gradients(big)
    accumulating.step()

    # What plain accumulation would score: each micro-batch against its own negatives only.
    with torch.no_grad():
        rows = [slice(i, i + MICRO_BATCH) for i in range(0, ACCUM_STEPS * MICRO_BATCH, MICRO_BATCH)]
        plain_loss = sum(loss_fn(outputs[0][r], outputs[1][r], *outputs[2:]) for r in rows) / ACCUM_STEPS
    return {
        "loss": loss.item(),
        "big_loss": big_loss.item(),
        "plain_loss": plain_loss.item(),
        "outputs": [t.double() for t in outputs],
        "output_difference": max((a - b).abs().max().item() for a, b in zip(outputs, big_outputs)),
        "gradient_difference": {name: (accumulated[name] - reference[name]).abs().max().item() for name in reference},
        "gradient_scale": {name: reference[name].abs().max().item() for name in reference},
        "steps": (steps_before_update, accumulating.global_steps),
    }


def _batchnorm_statistics(rank: int, world_size: int) -> dict:
    """ResNet running statistics after one accumulated step, and after plain train-mode
    forwards of the same micro-batches (each micro-batch moves them exactly once)."""
    from clipdist.engine import accumulate_gradients, build_engine
    from clipdist.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_resnet_config())
    twin = copy.deepcopy(model)
    engine = build_engine(
        model, OptimConfig(), DeepSpeedConfig(), local_batch=MICRO_BATCH, accum_steps=2, world_size=world_size, total_steps=10
    )
    micro_batches = split(rank_inputs(rank, 2 * MICRO_BATCH, image_size=32), MICRO_BATCH)
    accumulate_gradients(engine, build_loss(LossConfig()), micro_batches, torch.device("cpu"), torch.float32)
    initial = {name: buffer.clone() for name, buffer in twin.named_buffers()}
    with torch.no_grad():
        for micro_batch in micro_batches:
            twin(micro_batch.images, micro_batch.tokens)
    buffers, expected = dict(engine.module.named_buffers()), dict(twin.named_buffers())
    names = [name for name in expected if "running_" in name]
    return {
        "names": names,
        "difference": max((buffers[n] - expected[n]).abs().max().item() for n in names),
        "moved": max((expected[n] - initial[n]).abs().max().item() for n in names),
        "batches_tracked": int(buffers["visual.bn1.num_batches_tracked"]),
    }


def _patch_dropout_replayed(rank: int, world_size: int) -> float:
    """GradCache's gradients with FLIP patch dropout vs autograd through the same patches (the
    second forward of each micro-batch must keep the patches of its first): max relative error."""
    from clipdist.engine import accumulate_gradients, build_engine
    from clipdist.models import build_model

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_vit_config("gather", grad_checkpointing=True), patch_dropout=0.5))
    twin = copy.deepcopy(model)
    engine = build_engine(model, OptimConfig(), DeepSpeedConfig(), local_batch=MICRO_BATCH, accum_steps=2, world_size=world_size, total_steps=10)
    loss_fn = build_loss(LossConfig())
    micro_batches = split(rank_inputs(rank, 2 * MICRO_BATCH, image_size=16), MICRO_BATCH)
    before = torch.get_rng_state()
    accumulate_gradients(engine, loss_fn, micro_batches, torch.device("cpu"), torch.float32)
    torch.set_rng_state(before)  # the twin draws the patches of the first forwards
    outputs = [twin(m.images, m.tokens) for m in micro_batches]
    loss_fn(torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), outputs[0][2]).backward()
    grads = full_gradients(engine)
    return max(((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in twin.named_parameters() if p.grad is not None and p.grad.abs().max() > 0)


def _all_cases(rank: int, world_size: int) -> dict:
    results = {case: _accumulated_vs_big_batch(rank, world_size, *args) for case, args in CASES.items()}
    results["batchnorm"] = _batchnorm_statistics(rank, world_size)
    return results


@pytest.mark.slow
def test_patch_dropout_is_replayed_in_the_second_forward():
    """One rank: the gradient of the loss through the patches the first forward kept, within 1e-5
    (relative to each parameter's largest gradient, float32)."""
    assert run_distributed(_patch_dropout_replayed, world_size=1, timeout=120.0)[0] <= 1e-5


@pytest.fixture(scope="module")
def per_rank_results():
    """All cases in one pair of processes: spawning ranks and importing DeepSpeed dominate."""
    return run_distributed(_all_cases, world_size=2, timeout=300.0)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_accumulated_micro_batches_give_the_gradients_of_one_big_batch(per_rank_results, case):
    """k=4 micro-batches of 3 rows per rank (GradCache) against one batch of 12 rows per rank,
    both through DeepSpeed engines from clipdist.engine.build_engine, 2 gloo ranks, float32:
    every parameter gradient (towers, temperature, SigLIP bias) within 1e-5 (relative to the
    parameter's largest gradient entry, when above 1), the same loss within 1e-5, and the global
    loss equal to the float64 single-process loss over all 24 pairs within 1e-5."""
    loss_impl = CASES[case][1]
    results = [rank_results[case] for rank_results in per_rank_results]
    for rank, result in enumerate(results):
        assert result["steps"] == (0, 1), f"rank {rank}: optimizer steps before/after engine.step(): {result['steps']}"
        assert abs(result["loss"] - result["big_loss"]) <= LOSS_TOLERANCE, (rank, result["loss"], result["big_loss"])
        assert result["output_difference"] <= LOSS_TOLERANCE, (rank, result["output_difference"])
        excess = {
            name: difference / (GRAD_TOLERANCE * max(1.0, result["gradient_scale"][name]))
            for name, difference in result["gradient_difference"].items()
        }
        worst = max(excess, key=excess.get)
        assert excess[worst] <= 1.0, (rank, worst, result["gradient_difference"][worst], result["gradient_scale"][worst])
        # All-zero gradients would compare equal trivially.
        assert min(result["gradient_scale"].values()) > 1e-4, result["gradient_scale"]
        assert {"logit_scale"} | ({"logit_bias"} if loss_impl == "siglip" else set()) <= excess.keys()

    # The global loss (mean of the rank losses) against the float64 definition over all pairs.
    image = torch.cat([result["outputs"][0] for result in results])
    text = torch.cat([result["outputs"][1] for result in results])
    scalars = results[0]["outputs"][2:]
    reference = (siglip_loss_reference if loss_impl == "siglip" else clip_loss_reference)(image, text, *scalars)
    global_loss = sum(result["loss"] for result in results) / len(results)
    assert abs(global_loss - reference.item()) <= LOSS_TOLERANCE, (global_loss, reference.item())
    # The comparison has power: scoring each micro-batch alone (plain accumulation) differs clearly.
    for result in results:
        assert abs(result["plain_loss"] - result["loss"]) > 1000 * LOSS_TOLERANCE, (result["plain_loss"], result["loss"])


@pytest.mark.slow
def test_batchnorm_running_statistics_move_once_per_micro_batch(per_rank_results):
    """The graph-free first forward moves BatchNorm's running statistics; the re-forward with a
    graph must not move them again: after an accumulated step of 2 micro-batches they equal those
    of plain train-mode forwards of the 2 micro-batches (1e-6; num_batches_tracked exactly 2)."""
    for rank, rank_results in enumerate(per_rank_results):
        result = rank_results["batchnorm"]
        assert result["names"], "the ResNet has no BatchNorm buffers"
        assert result["moved"] > 1e-3, "the micro-batches did not move the statistics at all"
        assert result["difference"] <= 1e-6, (rank, result["difference"])
        assert result["batches_tracked"] == 2, (rank, result["batches_tracked"])


def test_accumulation_groups_never_span_an_epoch_and_resume_on_a_boundary():
    """Epoch 0 has 5 loader batches, epoch 1 has 5 starting at index 2 (a resume): with k=2 the
    steps take (0,1), (2,3) of epoch 0 — batch 4 is dropped — then (2,3), (4,5) of epoch 1, and
    each step reports the index of its last batch, so index + 1 is where a resume starts."""
    stream = [(0, i, f"e0b{i}") for i in range(5)] + [(1, i, f"e1b{i}") for i in range(2, 7)]
    assert list(accumulation_groups(stream, 2)) == [
        (0, 1, ["e0b0", "e0b1"]),
        (0, 3, ["e0b2", "e0b3"]),
        (1, 3, ["e1b2", "e1b3"]),
        (1, 5, ["e1b4", "e1b5"]),
    ]
    assert list(accumulation_groups(stream, 1)) == [(epoch, index, [batch]) for epoch, index, batch in stream]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_with_accumulation_trains_like_the_big_batch(tmp_path, digits):
    """The real entry point (torchrun, 2 ranks, DeepSpeed, digits shards): train.accum_steps=2 with
    data.local_batch=8 sees the same 16 rows per rank and step as data.local_batch=16 without
    accumulation, so its first 3 losses must match to 1e-5 (plain accumulation would score 8 rows
    per rank against 16 negatives instead of 32: a different loss from step 1)."""
    common = ["train.max_steps=3", "eval.zero_shot=[]", "eval.retrieval=[]"]
    accumulated = torchrun(tmp_path / "accum2", digits, *common, "train.accum_steps=2", "data.local_batch=8")
    big = losses(torchrun(tmp_path / "big", digits, *common, "data.local_batch=16"))
    assert [row["train/global_batch"] for row in accumulated if "train/loss" in row] == [32.0] * 3
    accumulated = losses(accumulated)
    assert accumulated.keys() == big.keys() == {1, 2, 3}
    for step in big:
        assert abs(accumulated[step] - big[step]) <= 1e-5, (step, accumulated[step], big[step])


def test_accum_steps_must_be_positive():
    cfg, _ = load_config(["+experiment=tiny", "train.accum_steps=4"])
    validate(cfg, world_size=2, check_data=False)  # accumulation is allowed
    cfg, _ = load_config(["+experiment=tiny", "train.accum_steps=0"])
    with pytest.raises(ConfigError, match=r"^train\.accum_steps: must be >= 1, got 0$"):
        validate(cfg, world_size=2, check_data=False)
