"""The capacity planner (clipdist/plan): each budget component against a hand computation or
against what torch itself saves, the choice of a step's shape, the CLI, and a 2-rank run with
data.local_batch=auto that reaches the asked global batch. (Against measured peak memory:
benchmarks/plan_vs_measured.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import QUIET_EVAL, TRAIN_ENV, entry_point, one_line_error, torchrun_result

from clipdist.config import load_config, validate
from clipdist.models import build_model
from clipdist.models.vit import ResidualAttentionBlock
from clipdist.plan import Device, DoesNotFit, choose, largest_global_batch, plan_batch
from clipdist.plan.memory import (
    CPU_RUNTIME_BYTES,
    GIB,
    ParamCounts,
    Shape,
    activations,
    block_saved_elements,
    budget,
    grad_cache,
    loss_buffers,
    model_states,
    param_counts,
    saved_bytes,
)

MIB = 2**20


def shape(**changes) -> Shape:
    base = Shape(world_size=4, micro_batch=8, accum_steps=1, loss_impl="gather", chunk_size=64, grad_checkpointing=False, zero_stage=0, precision="fp32", device="cpu")
    return replace(base, **changes)


def cfg_of(*overrides: str):
    return load_config(list(overrides))[0]


# ---------------------------------------------------------------------------------------------
# Components against hand computations and against torch


@pytest.mark.parametrize("act, per_width", [("quick_gelu", 20), ("gelu", 16)])
def test_a_transformer_block_saves_what_the_formula_counts(act, per_width):
    """Hand count: per token, LayerNorm inputs and outputs 4w (the block's input among them), q k v
    3w, attention output w, MLP hidden 4w pre-activation, 4w after (and 4w QuickGELU's sigmoid):
    20w (QuickGELU) or 16w (GELU). Reference: the storages torch's autograd saves in a real
    forward, which adds LayerNorm's mean and rstd and attention's log-sum-exp (below 2 % here)."""
    b, n, w = 4, 17, 128
    assert block_saved_elements(n, w, 4.0, act) == per_width * n * w
    block = ResidualAttentionBlock(w, 4, act=act)
    x = torch.randn(b, n, w, requires_grad=True)
    traced = saved_bytes(lambda: block(x), exclude=list(block.parameters()))
    predicted = b * block_saved_elements(n, w, 4.0, act) * 4
    assert predicted == pytest.approx(traced, rel=0.02), (predicted, traced)


@pytest.mark.parametrize("model, checkpointing", [("vit_tiny", False), ("vit_tiny", True), ("rn_tiny", False), ("rn_tiny", True), ("vitb32", False)])
def test_tower_activations_match_what_autograd_saves(model, checkpointing):
    """The whole model's saved activations (both towers, no working set) against torch's own
    saved tensors in a real CPU forward at batch 2, within 5 %."""
    cfg = cfg_of(f"model={model}", f"model.grad_checkpointing={str(checkpointing).lower()}")
    clip = build_model(cfg.model).train()
    images = torch.randn(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    tokens = torch.randint(1, 100, (2, cfg.model.text.context_length))
    traced = saved_bytes(lambda: clip(images, tokens), exclude=list(clip.parameters()))
    planned = activations(cfg.model, shape(micro_batch=2, grad_checkpointing=checkpointing))["saved"]
    assert planned == pytest.approx(traced, rel=0.05), (planned, traced)


def test_flip_patch_dropout_halves_the_image_activations():
    cfg = cfg_of("model=vitb16")
    full = activations(cfg.model, shape(micro_batch=1))["saved"]
    flip = activations(replace(cfg.model, patch_dropout=0.5), shape(micro_batch=1))["saved"]
    text = activations(replace(cfg.model, vision=replace(cfg.model.vision, layers=0)), shape(micro_batch=1))["saved"]
    # 197 tokens -> 1 + 98: the transformer part scales with the kept tokens; the image stays.
    assert (flip - text) / (full - text) == pytest.approx(99 / 197, abs=0.03)


def test_parameter_counts_are_the_models():
    for name in ("vit_tiny", "vitb32", "rn50"):
        cfg = cfg_of(f"model={name}")
        assert param_counts(cfg.model).total == build_model(cfg.model).num_params()
    lit = cfg_of("+experiment=lit_vitb32").model
    counts = param_counts(lit)
    assert counts.trainable < counts.total


def test_model_states_by_zero_stage_and_precision_hand_computed():
    """P = 10M trainable parameters on 4 ranks (GPU: buckets count whole)."""
    p, n = 10_000_000, 4
    params = ParamCounts(total=p, trainable=p, largest=1_000_000)
    gpu = dict(device="cuda", world_size=n)
    z0 = model_states(params, shape(zero_stage=0, precision="fp32", **gpu))
    # fp32 ZeRO-0: 4P weights, 8P moments; in the backward 4P gradients + a 4P flattened copy.
    assert (z0["parameters"], z0["optimizer states"], z0["gradients (kept)"], z0["gradients (in flight)"]) == (4 * p, 8 * p, 0, 8 * p)
    z2 = model_states(params, shape(zero_stage=2, precision="bf16", **gpu))
    # bf16 ZeRO-2: 2P weights; fp32 master + moments 12P / 4; fp32 gradient partition 4P / 4
    # plus the reduce bucket (min(P, 5e8) bf16), which is also what is in flight.
    assert z2["parameters"] == 2 * p and z2["optimizer states"] == 3 * p
    assert z2["gradients (kept)"] == p + 2 * p and z2["gradients (in flight)"] == 2 * p
    z3 = model_states(params, shape(zero_stage=3, precision="bf16", **gpu))
    # ZeRO-3: weights partitioned too (2P / 4), and the whole model gathered (P <= 1e9).
    assert z3["parameters"] == p // 2 and z3["optimizer states"] == 3 * p and z3["gathered parameters (ZeRO-3)"] == 2 * p
    z1 = model_states(params, shape(zero_stage=1, precision="bf16", **gpu))
    assert z1["gradients (in flight)"] == 2 * p  # ZeRO-1 reduces whole bf16 gradients at the step


def test_loss_buffers_and_caches_hand_computed():
    """b = 8 × 4 rows per rank, B = 128, d = 64, c = 16, fp32."""
    model = cfg_of("model=vit_tiny").model
    model = replace(model, embed_dim=64)
    s = shape(micro_batch=8, accum_steps=4, chunk_size=16)
    b, big_b, d, c = 32, 128, 64, 16
    assert loss_buffers(model, s) == (4 * b * big_b + 3 * big_b * d) * 4
    assert loss_buffers(model, replace(s, loss_impl="ring")) == (3 * b * d + 3 * b * c + 5 * big_b) * 4
    assert loss_buffers(model, replace(s, loss_impl="siglip")) == loss_buffers(model, replace(s, loss_impl="ring"))
    assert grad_cache(model, s) == {"embeddings": 2 * b * d * 4, "gradients": 2 * b * d * 4}
    assert grad_cache(model, replace(s, accum_steps=1)) == {"embeddings": 0, "gradients": 0}


def test_the_budget_takes_the_larger_phase():
    cfg = cfg_of("model=vit_tiny")
    single = budget(cfg, shape(micro_batch=64))
    assert set(single.peaks) == {"step", "evaluation"} and single.components["runtime"] == CPU_RUNTIME_BYTES
    accumulated = budget(cfg, shape(micro_batch=16, accum_steps=4))
    assert set(accumulated.peaks) == {"loss on cached embeddings", "micro-batch backward", "evaluation"}
    assert accumulated.peak == max(accumulated.peaks.values())
    # Smaller micro-batches: fewer activations; the loss over the same global batch is the same.
    assert accumulated.components["activations (saved)"] * 4 == pytest.approx(single.components["activations (saved)"])
    assert accumulated.components["loss buffers"] == single.components["loss buffers"]


# ---------------------------------------------------------------------------------------------
# Choosing a shape


def test_choose_takes_the_largest_micro_batch_that_fits_and_gather_when_it_fits():
    cfg = cfg_of("model=vit_tiny")
    roomy = choose(cfg, 2, 1024, Device(memory_bytes=8 * GIB, kind="cpu"))
    assert (roomy.shape.micro_batch, roomy.shape.accum_steps, roomy.shape.loss_impl, roomy.shape.grad_checkpointing) == (512, 1, "gather", False)
    tight = choose(cfg, 2, 1024, Device(memory_bytes=400 * MIB, kind="cpu"), choose_loss=False, choose_checkpointing=False)
    assert tight.fits and tight.shape.micro_batch * tight.shape.accum_steps == 512 and tight.shape.micro_batch < 512
    bigger = replace(tight.shape, micro_batch=tight.shape.micro_batch * 2, accum_steps=tight.shape.accum_steps // 2)
    assert budget(cfg, bigger).peak > 400 * MIB, "the next larger micro-batch would not fit"
    # Where gather's [b, B] logits cannot fit, ring can.
    cfg.loss.chunk_size = 256
    huge = choose(cfg, 2, 1 << 17, Device(memory_bytes=2 * GIB, kind="cpu"))
    assert huge.shape.loss_impl == "ring"
    assert largest_global_batch(cfg, 2, Device(memory_bytes=2 * GIB, kind="cpu"), huge) >= 1 << 17


def test_what_does_not_fit_names_the_component_and_the_overflow():
    cfg = cfg_of("model=vitb32", "loss.impl=gather")
    with pytest.raises(DoesNotFit) as caught:
        choose(cfg, 2, 1 << 20, Device(memory_bytes=4 * GIB, kind="cpu"), choose_loss=False)
    message = str(caught.value)
    assert re.search(r"over by [0-9.]+ GiB; largest: loss buffers [0-9.]+ GiB", message), message


# ---------------------------------------------------------------------------------------------
# The CLI and data.local_batch=auto


def plan_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipdist.plan", *arguments], capture_output=True, text=True, timeout=120, env={**TRAIN_ENV})


def test_the_cli_plans_vitl14_at_16m_on_32_nodes():
    result = plan_cli("--json", "+experiment=vitl14", "launch.nodes=32", "launch.gpus_per_node=8", "launch.gpu_memory_gb=80", "train.global_batch=16777216")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] and plan["peak_bytes"] <= 80 * GIB
    assert plan["micro_batch"] * plan["accum_steps"] * plan["world_size"] == 16777216 and plan["world_size"] == 256
    assert plan["largest_global_batch"] >= 16777216 and plan["step_seconds"] > 0
    assert plan["peak_bytes"] == max(plan["peaks_bytes"].values())
    # Host side, by hand: 65,536 rows per rank of 3 × 224² fp32 pixels and 77 int64 token ids.
    assert plan["host_inputs_bytes_per_rank"] == 65536 * (3 * 224 * 224 * 4 + 77 * 8)
    text = plan_cli("+experiment=vitl14", "launch.nodes=32", "launch.gpus_per_node=8", "launch.gpu_memory_gb=80", "train.global_batch=16777216")
    assert "memory per GPU (GiB):" in text.stdout and "largest global batch that fits" in text.stdout


def test_the_cli_refuses_in_one_line():
    missing = plan_cli("+experiment=vitl14")
    assert missing.returncode == 2 and missing.stderr.strip() == "clipdist: config error: launch.gpu_memory_gb: the planner needs each GPU's memory, e.g. launch.gpu_memory_gb=80"
    tiny_gpu = plan_cli("+experiment=vitl14", "launch.gpu_memory_gb=2", "train.global_batch=1024")
    assert tiny_gpu.returncode == 1 and tiny_gpu.stderr.count("\n") == 1 and "over by" in tiny_gpu.stderr, tiny_gpu.stderr


def test_local_batch_auto_needs_the_global_batch_and_the_memory():
    cfg = cfg_of("+experiment=digits", "data.local_batch=auto", "train.global_batch=null")
    with pytest.raises(Exception, match="data.local_batch: auto reaches train.global_batch"):
        validate(cfg, 2, check_data=False)
    cfg = cfg_of("+experiment=digits", "data.local_batch=auto", "train.global_batch=512")
    with pytest.raises(Exception, match="data.local_batch: auto plans for launch.gpu_memory_gb"):
        validate(cfg, 2, check_data=False)


@pytest.mark.slow
def test_a_two_rank_run_with_auto_batch_reaches_the_global_batch(tmp_path, digits):
    """data.local_batch=auto and train.accum_steps=auto on 2 ranks: the plan's micro-batch and
    accumulation (here the memory forces accumulation), the asked global batch, the plan logged."""
    memory_gb = 0.3
    overrides = ["data.local_batch=auto", "train.accum_steps=auto", "train.global_batch=512", f"launch.gpu_memory_gb={memory_gb}", "train.max_steps=2"]
    cfg = cfg_of("+experiment=digits", *overrides)
    planned = plan_batch(cfg, 2)
    assert planned.shape.accum_steps > 1, "the test's memory should force accumulation"
    result, rows = torchrun_result(tmp_path / "run", digits, *QUIET_EVAL, *overrides, "logging.wandb_mode=disabled", experiment="digits")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_batch"] == 512 and summary["steps"] == 2 and rows[-1]["step"] == 2
    memory = summary["peak_memory"]  # what the plan predicts, measured per rank
    assert len(memory["rss_bytes"]) == 2 and all(peak > start > 0 for peak, start in zip(memory["rss_bytes"], memory["rss_at_start_bytes"]))
    assert memory["gpu_allocated_bytes"] == [0, 0]
    b, k = planned.shape.micro_batch, planned.shape.accum_steps
    assert f"global batch 512 = {b} local × 2 ranks × {k} accumulation" in output, output[-3000:]
    line = next(line for line in output.splitlines() if "memory plan: peak" in line)
    assert f"of {memory_gb:.2f} GiB per rank" in line and "OVER" not in line, line


def test_auto_batch_refuses_in_one_line_when_nothing_fits():
    result = entry_point("clipdist.train", "+experiment=digits", "data.local_batch=auto", "train.global_batch=512", "launch.gpu_memory_gb=0.1")
    line = one_line_error(result, "config error")
    assert line.startswith("clipdist: config error: data.local_batch: auto: global batch 512 on 1 rank(s) does not fit in 0.1 GiB per rank")
