"""clipdist.perf: the analytic FLOP count against torch's FlopCounterMode, the peak table, and the
MFU arithmetic of ThroughputMeter."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipdist.config import ModelConfig, load_config
from clipdist.models import build_model
from clipdist.perf import (
    ThroughputMeter,
    build_throughput_meter,
    image_tower_flops,
    lookup_peak_tflops,
    peak_tflops,
    text_flops,
    training_flops,
)

REPO = Path(__file__).resolve().parent.parent
# The analytic count must be within 5 % of FlopCounterMode's (it agrees exactly today; the slack
# lets either side add or drop a minor term without failing).
FLOP_TOLERANCE = 0.05
BATCH = 2  # BatchNorm in training needs more than one row at the ResNet's 1x1 final map


def model_config(name: str, **changes) -> ModelConfig:
    return dataclasses.replace(load_config([f"model={name}"])[0].model, **changes)


def random_inputs(cfg: ModelConfig, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (batch, cfg.text.context_length), generator=generator)
    tokens[:, -1] = cfg.text.vocab_size - 1  # EOT, where the text tower pools
    return torch.randn(batch, 3, size, size, generator=generator), tokens


def counted(run) -> FlopCounterMode:
    """FlopCounterMode over ``run()``. SDPA's math backend decomposes attention into the bmm ops
    the counter sees; the fused CPU kernel has no FLOP formula and would count as 0."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        run()
    return counter


def tower_flops_counted(cfg: ModelConfig, *, train: bool) -> dict[str, float]:
    """Per-sample forward FLOPs of each tower, counted on the real model."""
    torch.manual_seed(0)
    model = build_model(cfg).train(train)
    images, tokens = random_inputs(cfg)
    with torch.no_grad():
        counts = counted(lambda: model(images, tokens)).get_flop_counts()
    return {tower: sum(counts[f"CLIP.{tower}"].values()) / BATCH for tower in ("visual", "text")}


def step_flops_counted(cfg: ModelConfig) -> float:
    """Per-sample FLOPs of forward + backward (checkpointing's recomputation included)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, tokens = random_inputs(cfg)

    def step() -> None:
        image_emb, text_emb, _ = model(images, tokens)
        (image_emb * text_emb).sum().backward()  # elementwise: adds no counted FLOPs

    return counted(step).get_total_flops() / BATCH


@pytest.mark.parametrize("name", ["vit_tiny", "rn_tiny", "vitb32"])
def test_forward_flops_match_flop_counter(name):
    cfg = model_config(name)
    measured = tower_flops_counted(cfg, train=False)
    assert image_tower_flops(cfg, training=False).forward == pytest.approx(measured["visual"], rel=FLOP_TOLERANCE)
    assert text_flops(cfg.text, cfg.embed_dim).forward == pytest.approx(measured["text"], rel=FLOP_TOLERANCE)


def test_vitb32_forward_is_the_published_14_8_gflops():
    # OpenCLIP's model table: ViT-B-32 at 224 px, 7.40 GMACs for both towers = 14.8 GFLOPs.
    assert training_flops(model_config("vitb32")).forward / 1e9 == pytest.approx(14.8, rel=0.01)


def test_patch_dropout_flops_match_flop_counter():
    """ViT-B/32 with FLIP's 0.5 keeps 24 of 49 patches in training (plus the class token)."""
    cfg = model_config("vitb32", patch_dropout=0.5)
    measured = tower_flops_counted(cfg, train=True)["visual"]
    full = image_tower_flops(cfg, training=False).forward
    if measured == pytest.approx(full, rel=1e-6):
        pytest.skip("clipdist/models/vit.py keeps every patch in training: no patch dropout to count")
    assert image_tower_flops(cfg, training=True).forward == pytest.approx(measured, rel=FLOP_TOLERANCE)
    assert measured < 0.6 * full


@pytest.mark.parametrize("name", ["vit_tiny", "rn_tiny"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_training_flops_match_flop_counter(name, checkpointing):
    """Model FLOPs (3x forward) against a counted forward + backward; with checkpointing the
    counter also sees the recomputation, which is what the hardware FLOPs add."""
    cfg = model_config(name, grad_checkpointing=checkpointing)
    flops = training_flops(cfg)
    measured = step_flops_counted(cfg)
    assert (flops.hardware if checkpointing else flops.model) == pytest.approx(measured, rel=FLOP_TOLERANCE)
    assert flops.model == pytest.approx(3 * flops.forward)


@pytest.mark.parametrize("unlocked", [0, 1])
def test_locked_image_tower_flops_match_flop_counter(unlocked):
    """LiT: backward runs through the unlocked blocks and the head only."""
    cfg = model_config("vit_tiny", lock_image=True, lock_image_unlocked_blocks=unlocked, patch_dropout=0.5)
    flops = training_flops(cfg)
    assert flops.model == pytest.approx(step_flops_counted(cfg), rel=FLOP_TOLERANCE)
    assert flops.model < 3 * flops.forward


def test_grad_cache_and_logits_count_as_stated():
    cfg = model_config("vit_tiny")
    towers = training_flops(cfg)
    with_loss = training_flops(cfg, global_batch=1024, accum_steps=4)
    similarity_row = 2 * 1024 * cfg.embed_dim  # one row of the [B, B] similarity matrix
    assert with_loss.model == pytest.approx(towers.model + 3 * similarity_row)
    # GradCache's graph-free forward: hardware, not model, FLOPs.
    assert with_loss.hardware - with_loss.model == pytest.approx(towers.forward)


@pytest.mark.parametrize(
    "device_name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L4", 121.0),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("Tesla V100-PCIE-32GB", 112.0),
        ("Tesla T4", 65.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_tflops_lookup(device_name, tflops):
    assert lookup_peak_tflops(device_name) == tflops


def test_configured_peak_wins_and_a_cpu_has_none():
    assert peak_tflops(123.0, torch.device("cpu")) == 123.0
    assert peak_tflops(None, torch.device("cpu")) is None


class FakeClock:
    """Seconds that the test advances by hand: the meter's arithmetic without timing."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_reports_tflops_and_mfu_of_training_time_only():
    clock = FakeClock()
    meter = ThroughputMeter(flops_per_sample=2e9, peak_tflops=100.0, world_size=4, clock=clock)
    for _ in range(3):
        clock.now += 2.0  # a step: 512 global samples in 2 s
        meter.add(torch.tensor(1.0), 512)
        with meter.paused():
            clock.now += 5.0  # logging, eval, checkpoints: not training time
    rates = meter.interval_rates()
    # 1536 samples / 6 s = 256 samples/s; 2e9 FLOPs each over 4 devices = 0.128 TFLOP/s per device.
    assert rates["perf/samples_per_second"] == pytest.approx(256.0)
    assert rates["perf/tflops_per_device"] == pytest.approx(0.128)
    assert rates["perf/mfu"] == pytest.approx(0.128 / 100.0)
    assert meter.train_seconds == pytest.approx(6.0) and meter.train_samples == 1536


def test_meter_without_peak_or_flops_reports_what_it_knows():
    assert set(ThroughputMeter(flops_per_sample=1e9).utilization(10.0)) == {"perf/tflops_per_device"}
    assert ThroughputMeter().utilization(10.0) == {}


def test_training_meter_uses_the_run_config():
    cfg = load_config(["+experiment=tiny", "logging.peak_tflops=50"])[0]
    meter = build_throughput_meter(cfg, world_size=2, device=torch.device("cpu"))
    expected = training_flops(cfg.model, global_batch=cfg.data.local_batch * 2 * cfg.train.accum_steps).model
    assert (meter.flops_per_sample, meter.peak_tflops, meter.world_size) == (pytest.approx(expected), 50.0, 2)


def test_gpu_throughput_runs_in_cpu_mode(tmp_path):
    out = tmp_path / "gpu_throughput_cpu.json"
    command = [sys.executable, "benchmarks/gpu_throughput.py", "--cpu-tiny", "--batches", "4", "--steps", "1", "--warmup", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu"
    cases = {(case["grad_checkpointing"], case["patch_dropout"]): case for case in result["cases"]}
    assert set(cases) == {(False, 0.0), (False, 0.5), (True, 0.0), (True, 0.5)}
    assert all(case["status"] == "ok" and case["samples_per_second"] > 0 and case["mfu"] is None for case in cases.values())
