"""Throughput, FLOPs and model-FLOPs utilisation (MFU) of CLIP training.

The FLOPs are analytic — counted from the model config, not traced — so the training loop reports
MFU from its first interval at no cost. They follow the conventions of
``torch.utils.flop_counter.FlopCounterMode``, against which tests/test_perf.py checks them: a
multiply-add is 2 FLOPs; only matrix products and convolutions count (norms, activations, softmax
and pooling are free); causal attention counts its full [N, N] products.

Per training sample (model FLOPs as in PaLM, Chowdhery et al. 2022, appendix B):

    model FLOPs    = forward + 2 × forward of what backward runs through (weight and input
                     gradients): 3 × forward, or less where LiT freezes the image tower
    hardware FLOPs = model FLOPs + what is computed twice: the blocks that gradient checkpointing
                     recomputes, and GradCache's graph-free first forward (train.accum_steps > 1)

MFU = model FLOPs per second per device ÷ the device's peak dense bf16 FLOP/s.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from clipdist.config import Config, ModelConfig, TextConfig, global_batch
from clipdist.distributed import all_reduce_sum
from clipdist.models.vit import PatchDropout

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class TowerFlops:
    """Forward FLOPs of one tower for one sample, split as training treats the parts: ``blocks``
    are what gradient checkpointing recomputes and what LiT unlocks one by one (ViT and text:
    residual blocks; ResNet: stages); ``stem`` comes before them and ``head`` after."""

    stem: float
    blocks: Tuple[float, ...]
    head: float
    # FLOPs at the end of each block that checkpointing does not recompute: torch's non-reentrant
    # checkpoint stops once backward has every tensor it saved, and no backward needs the output of
    # a transformer block's last MLP projection.
    block_tail: float = 0.0

    @property
    def forward(self) -> float:
        return self.stem + sum(self.blocks) + self.head

    @property
    def recomputed(self) -> float:
        """What gradient checkpointing computes a second time in backward."""
        return sum(self.blocks) - len(self.blocks) * self.block_tail

    def trained(self, unlocked_blocks: Optional[int] = None) -> "TowerFlops":
        """The part that backward runs through: all of it, or with a locked tower (LiT) its last
        ``unlocked_blocks`` blocks and, when there are any, the head (CLIP.lock_image)."""
        if unlocked_blocks is None:
            return self
        if unlocked_blocks == 0:
            return TowerFlops(0.0, (), 0.0)
        first = max(0, len(self.blocks) - unlocked_blocks)
        return TowerFlops(0.0, self.blocks[first:], self.head, self.block_tail)


def _linear(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def _conv(out_pixels: int, in_channels: int, out_channels: int, kernel: int) -> float:
    return 2.0 * out_pixels * in_channels * out_channels * kernel * kernel


def transformer_block_flops(tokens: int, width: int, hidden: int) -> float:
    """One pre-LN residual block: q, k, v and output projections, the score and value products
    (summed over heads they are [N, N] × width each, whatever the head count), the MLP."""
    projections = _linear(tokens, width, 3 * width) + _linear(tokens, width, width)
    attention = 2 * (2.0 * tokens * tokens * width)
    mlp = _linear(tokens, width, hidden) + _linear(tokens, hidden, width)
    return projections + attention + mlp


def image_tokens(cfg: ModelConfig, training: bool = True) -> int:
    """Tokens through the ViT's blocks: the patches that FLIP's patch dropout keeps in training
    (all of them in eval, and in a fully locked tower, which stays in eval) + the class token."""
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    fully_locked = cfg.lock_image and cfg.lock_image_unlocked_blocks == 0
    if training and not fully_locked:
        patches = PatchDropout(cfg.patch_dropout).kept_patches(patches)
    return patches + 1


def vit_flops(cfg: ModelConfig, training: bool = True) -> TowerFlops:
    vision = cfg.vision
    grid = vision.image_size // vision.patch_size
    tokens = image_tokens(cfg, training)
    hidden = int(vision.width * vision.mlp_ratio)
    return TowerFlops(
        stem=_conv(grid * grid, 3, vision.width, vision.patch_size),  # every patch is embedded
        blocks=(transformer_block_flops(tokens, vision.width, hidden),) * vision.layers,
        head=_linear(1, vision.width, cfg.embed_dim),  # the class token only
        block_tail=_linear(tokens, hidden, vision.width),
    )


def resnet_flops(cfg: ModelConfig) -> TowerFlops:
    """OpenAI's ModifiedResNet (clipdist/models/resnet.py), convolution by convolution."""
    width, size = cfg.vision.width, cfg.vision.image_size
    half = (size // 2) ** 2  # the stem's three 3×3 convolutions run at half resolution
    stem = _conv(half, 3, width // 2, 3) + _conv(half, width // 2, width // 2, 3) + _conv(half, width // 2, width, 3)
    stages, inplanes, side = [], width, size // 4  # the stem's average pool halves again
    for index, blocks in enumerate(cfg.vision.stage_blocks):
        planes, stride = width * 2**index, 1 if index == 0 else 2
        flops = 0.0
        for block in range(blocks):
            block_stride = stride if block == 0 else 1
            out_side = side // block_stride
            flops += _conv(side * side, inplanes, planes, 1) + _conv(side * side, planes, planes, 3)
            flops += _conv(out_side * out_side, planes, planes * 4, 1)  # after the anti-aliasing pool
            if block_stride > 1 or inplanes != planes * 4:
                flops += _conv(out_side * out_side, inplanes, planes * 4, 1)  # downsample branch
            inplanes, side = planes * 4, out_side
        stages.append(flops)
    return TowerFlops(stem=stem, blocks=tuple(stages), head=attention_pool_flops(side * side + 1, inplanes, cfg.embed_dim))


def attention_pool_flops(tokens: int, width: int, embed_dim: int) -> float:
    """One query (the mean feature) against every position: k and v for all tokens, q for one."""
    projections = _linear(1, width, width) + 2 * _linear(tokens, width, width)
    attention = 2 * (2.0 * tokens * width)
    return projections + attention + _linear(1, width, embed_dim)


def text_flops(cfg: TextConfig, embed_dim: int, length: Optional[int] = None) -> TowerFlops:
    """The causal text transformer; the token embedding is a lookup (0 FLOPs), the projection
    takes the EOT token only."""
    tokens = cfg.context_length if length is None else length
    hidden = 4 * cfg.width  # the text tower's MLP ratio is fixed (clipdist/models/text.py)
    return TowerFlops(
        stem=0.0,
        blocks=(transformer_block_flops(tokens, cfg.width, hidden),) * cfg.layers,
        head=_linear(1, cfg.width, embed_dim),
        block_tail=_linear(tokens, hidden, cfg.width),
    )


def image_tower_flops(cfg: ModelConfig, training: bool = True) -> TowerFlops:
    if cfg.vision.arch == "vit":
        return vit_flops(cfg, training)
    if cfg.vision.arch == "resnet":
        return resnet_flops(cfg)
    raise ValueError(f"model.vision.arch: expected 'vit' or 'resnet', got {cfg.vision.arch!r}")


def similarity_flops(global_batch: int, embed_dim: int) -> float:
    """Per sample, its row of the [B, B] image-text similarity matrix. (The gathered loss computes
    the matrix once per direction; the second is implementation, not model, FLOPs.)"""
    return 2.0 * global_batch * embed_dim


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs per training sample (see the module docstring)."""

    forward: float
    model: float
    hardware: float


def training_flops(
    cfg: ModelConfig, *, global_batch: Optional[int] = None, accum_steps: int = 1, text_length: Optional[int] = None
) -> TrainingFlops:
    """FLOPs per training sample of ``cfg`` at its image size and ``text_length`` tokens (default:
    the context length, which the data pipeline pads to). ``global_batch``: also count the
    sample's similarity row (the logits matmul of the loss); None leaves the loss out."""
    image = image_tower_flops(cfg, training=True)
    text = text_flops(cfg.text, cfg.embed_dim, text_length)
    image_trained = image.trained(cfg.lock_image_unlocked_blocks if cfg.lock_image else None)
    logits = similarity_flops(global_batch, cfg.embed_dim) if global_batch else 0.0
    forward = image.forward + text.forward + logits
    model = forward + 2 * (image_trained.forward + text.forward + logits)
    recomputed = image_trained.recomputed + text.recomputed if cfg.grad_checkpointing else 0.0
    # GradCache embeds every micro-batch once without a graph before the forward it backprops.
    graph_free_forward = image.forward + text.forward if accum_steps > 1 else 0.0
    return TrainingFlops(forward=forward, model=model, hardware=model + recomputed + graph_free_forward)


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s

# Dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s with fp32 accumulation, from NVIDIA's
# datasheets, which print the sparse figure: half of it is the dense one.
#   H100 SXM / PCIe / NVL, H800: "NVIDIA H100 Tensor Core GPU" datasheet (1979 / 1513 / 1671 sparse)
#   H200 SXM / NVL, GH200: "NVIDIA H200 Tensor Core GPU" datasheet (1979 / 1671 sparse)
#   H20: 148 dense as published for the China SKU
#   B200: HGX B200 datasheet, 4.5 PFLOP/s sparse per GPU
#   A100 / A800 (SXM and PCIe alike): A100 datasheet, 312 dense
#   A30 165, A40 149.7, A10 125, RTX A6000 154.8, L40S 362.05, L40 181.05, L4 121: their datasheets
#   A10G (AWS G5): 70, not the A10's 125 — a different SKU with fewer tensor-core FLOPs
#     (AWS's A10G sheet, as compared in Baseten's "NVIDIA A10 vs A10G"); Lightning's table uses 125.
#   RTX 4090: Ada Lovelace whitepaper, 165.2 with fp32 accumulation
#   V100 SXM2 / PCIe / V100S, T4: fp16 (they have no bf16 tensor cores): Volta and T4 datasheets.
# Patterns are tried in order, as whole words of torch.cuda.get_device_name() (case-insensitive),
# so that "A10" does not match "A100" nor "H200" match "GH200"; variants come before their base.
PEAK_TFLOPS: Tuple[Tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3") and other variants
    ("H800 PCIe", 756.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A30", 165.0),
    ("A40", 149.7),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX A6000", 154.8),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("V100S", 130.0),
    ("V100-PCIE", 112.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def _whole_word(pattern: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(pattern)}(?![A-Za-z0-9])", re.IGNORECASE)


_PEAK_PATTERNS = tuple((_whole_word(pattern), tflops) for pattern, tflops in PEAK_TFLOPS)


def lookup_peak_tflops(device_name: str) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of a GPU named as torch.cuda.get_device_name() names it; None when
    the table does not know it."""
    for pattern, tflops in _PEAK_PATTERNS:
        if pattern.search(device_name):
            return tflops
    return None


def peak_tflops(configured: Optional[float], device: torch.device) -> Optional[float]:
    """logging.peak_tflops when set; else the table's figure for a CUDA device; else None (a CPU,
    or a GPU the table lacks: MFU is then not logged)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    found = lookup_peak_tflops(name)
    if found is None:
        log.warning("no peak TFLOP/s known for %r; set logging.peak_tflops to log perf/mfu", name)
    return found


# ---------------------------------------------------------------------------------------------
# Throughput


class ThroughputMeter:
    """Training time and samples/s, with logging, eval and checkpoints paused out of the clock;
    with the model FLOPs per sample, also TFLOP/s per device and, given the peak, MFU.

    Samples are global (every rank's, as ``add`` is told); ``world_size`` divides them per device.
    ``clock`` is the time source (seconds)."""

    def __init__(
        self,
        flops_per_sample: Optional[float] = None,
        peak_tflops: Optional[float] = None,
        world_size: int = 1,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.flops_per_sample = flops_per_sample
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self.train_seconds = 0.0
        self.train_samples = 0
        self._clock = clock
        self._interval_seconds, self._interval_samples, self._losses = 0.0, 0, []
        self._started = clock()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self._losses.append(loss)
        self._interval_samples += samples
        self.train_samples += samples

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        elapsed = self._clock() - self._started
        self._interval_seconds += elapsed
        self.train_seconds += elapsed
        try:
            yield
        finally:
            self._started = self._clock()

    def flush(self, engine, logit_scale: torch.Tensor) -> Dict[str, float]:
        """Metrics since the last flush; call inside `paused()`."""
        # Each rank's loss is the mean over its own rows; the global loss is the mean over ranks.
        local_mean = torch.stack(self._losses).double().mean().reshape(1).cpu()
        metrics = {
            "train/loss": all_reduce_sum(local_mean).item() / engine.world_size,
            "train/lr": engine.get_lr()[0],
            "train/logit_scale": float(logit_scale.detach().float().reshape(-1)[0]),
            **self.interval_rates(),
            "train/global_batch": float(engine.train_batch_size()),
        }
        self._interval_seconds, self._interval_samples, self._losses = 0.0, 0, []
        return metrics

    def interval_rates(self) -> Dict[str, float]:
        """perf/ metrics of the interval since the last flush (which resets it)."""
        samples_per_second = self._interval_samples / max(self._interval_seconds, 1e-9)
        return {"perf/samples_per_second": samples_per_second, **self.utilization(samples_per_second)}

    def utilization(self, samples_per_second: float) -> Dict[str, float]:
        """TFLOP/s per device and MFU at ``samples_per_second`` global samples; {} without a FLOP count."""
        if self.flops_per_sample is None:
            return {}
        tflops = self.flops_per_sample * samples_per_second / self.world_size / 1e12
        rates = {"perf/tflops_per_device": tflops}
        if self.peak_tflops:
            rates["perf/mfu"] = tflops / self.peak_tflops
        return rates


def build_throughput_meter(cfg: Config, world_size: int, device: torch.device) -> ThroughputMeter:
    """The meter of a training run: model FLOPs per sample of cfg.model at the run's global batch,
    and the device's peak (logging.peak_tflops or the table's)."""
    batch = global_batch(cfg, world_size)
    flops = training_flops(cfg.model, global_batch=batch, accum_steps=cfg.train.accum_steps)
    peak = peak_tflops(cfg.logging.peak_tflops, device)
    log.info(
        "%s: %.2f GFLOPs per training sample (model; %.2f with recomputation), forward %.2f; peak %s TFLOP/s per device",
        cfg.model.name,
        flops.model / 1e9,
        flops.hardware / 1e9,
        flops.forward / 1e9,
        "unknown" if peak is None else f"{peak:g}",
    )
    return ThroughputMeter(flops.model, peak, world_size)

