"""The ring SigLIP loss against the single-process full-batch sigmoid loss: values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import run_distributed
from test_loss import LOCAL_BATCH, SCALE, _embeddings
from test_ring_loss import CHUNK_SIZES, TOLERANCES, assert_matches, engine_step

from clipdist.losses import SigLipLoss, siglip_loss_reference

# Moderate, so that both the positive and the negative pairs have sizeable gradients (the model
# initialises bias to -10, where the negatives' gradients are ~1e-5).
BIAS = -3.0
GRAD_NAMES = ("image", "text", "logit_scale", "logit_bias")


def _numpy_siglip_loss(image: np.ndarray, text: np.ndarray, scale: float, bias: float) -> float:
    """Written from the paper's definition, one pair at a time, independent of torch."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = scale * float(image[i] @ text[j]) + bias
            total += math.log1p(math.exp(-label * logit))  # -log sigmoid(label * logit)
    return total / n


def _reference_loss_and_grads(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor([SCALE], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([BIAS], dtype=torch.float64, requires_grad=True)
    loss = siglip_loss_reference(image, text, scale, bias)
    loss.backward()
    return loss.detach(), [image.grad, text.grad, scale.grad, bias.grad]


def test_reference_matches_independent_formula():
    image, text = _embeddings(10)
    expected = _numpy_siglip_loss(image.numpy(), text.numpy(), SCALE, BIAS)
    got = siglip_loss_reference(image, text, torch.tensor([SCALE], dtype=torch.float64), torch.tensor([BIAS], dtype=torch.float64)).item()
    assert abs(got - expected) <= 1e-12, f"reference {got} vs numpy loop {expected} (float64, tol 1e-12)"


def _siglip(rank: int, world_size: int, image_all: torch.Tensor, text_all: torch.Tensor) -> dict:
    return {
        (dtype, chunk_size): engine_step(rank, world_size, SigLipLoss(chunk_size=chunk_size), image_all, text_all, dtype, (SCALE, BIAS))
        for dtype in TOLERANCES
        for chunk_size in CHUNK_SIZES
    }


def test_single_process_without_group_matches_reference():
    image, text = _embeddings(LOCAL_BATCH)
    ref_loss, ref_grads = _reference_loss_and_grads(image, text)
    for (dtype, chunk_size), got in _siglip(0, 1, image, text).items():
        # Reference: autograd of siglip_loss_reference (float64, full B×B).
        assert_matches([got], ref_loss, ref_grads, TOLERANCES[dtype], GRAD_NAMES, f"{dtype} chunk {chunk_size}")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_siglip_matches_full_batch(world_size: int):
    image, text = _embeddings(world_size * LOCAL_BATCH, seed=world_size)
    ref_loss, ref_grads = _reference_loss_and_grads(image, text)
    per_rank = run_distributed(_siglip, world_size=world_size, args=(image, text))
    for dtype, chunk_size in per_rank[0]:
        # Reference: autograd of siglip_loss_reference (float64, full B×B); the mean rank loss is
        # the full loss and the rank-averaged gradients are its gradients, bias included.
        results = [result[dtype, chunk_size] for result in per_rank]
        assert_matches(results, ref_loss, ref_grads, TOLERANCES[dtype], GRAD_NAMES, f"siglip {dtype} chunk {chunk_size} world {world_size}")
