"""The distributed CLIP loss against the single-process full-batch loss: values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_distributed

from clipdist.config import LossConfig
from clipdist.losses import GatherClipLoss, build_loss, clip_loss_reference

LOCAL_BATCH = 5
DIM = 8
SCALE = 7.5


def _embeddings(global_batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(global_batch, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(global_batch, DIM, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def _reference_loss_and_grads(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor([SCALE], dtype=torch.float64, requires_grad=True)
    loss = clip_loss_reference(image, text, scale)
    loss.backward()
    return loss.detach(), [image.grad, text.grad, scale.grad]


def _numpy_clip_loss(image: np.ndarray, text: np.ndarray, scale: float) -> float:
    """Written from the definition, one row at a time, independent of torch."""
    n = image.shape[0]
    logits = scale * image @ text.T
    total = 0.0
    for i in range(n):
        row, col = logits[i], logits[:, i]
        total += -(row[i] - math.log(np.exp(row - row.max()).sum()) - row.max())
        total += -(col[i] - math.log(np.exp(col - col.max()).sum()) - col.max())
    return total / (2 * n)


def test_reference_matches_independent_formula():
    image, text = _embeddings(10)
    expected = _numpy_clip_loss(image.numpy(), text.numpy(), SCALE)
    got = clip_loss_reference(image, text, torch.tensor([SCALE], dtype=torch.float64)).item()
    assert abs(got - expected) <= 1e-12, f"reference {got} vs numpy loop {expected} (float64, tol 1e-12)"


def test_world_size_one_equals_reference():
    image, text = _embeddings(LOCAL_BATCH)
    ref_loss, ref_grads = _reference_loss_and_grads(image, text)
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor([SCALE], dtype=torch.float64, requires_grad=True)
    loss = GatherClipLoss()(image, text, scale)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-12, "world size 1 loss vs reference (float64, tol 1e-12)"
    for name, got, ref in zip(("image", "text", "logit_scale"), [image.grad, text.grad, scale.grad], ref_grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12, msg=f"{name} grad, world size 1 vs reference (tol 1e-12)")


def _rank_loss_and_engine_grads(rank: int, world_size: int, image_all: torch.Tensor, text_all: torch.Tensor, dtype: torch.dtype):
    """One training step's loss/backward as the engine sees it.

    The full embedding tables and logit_scale act as parameters replicated on every rank; rank r's
    forward selects its rows. After backward the engine averages parameter gradients over ranks:
    all_reduce(grad) / world_size.
    """
    image_param = image_all.to(dtype, copy=True).requires_grad_()
    text_param = text_all.to(dtype, copy=True).requires_grad_()
    scale = torch.tensor([SCALE], dtype=dtype, requires_grad=True)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss = GatherClipLoss()(image_param[rows], text_param[rows], scale)
    loss.backward()
    grads = [image_param.grad, text_param.grad, scale.grad]
    for grad in grads:
        dist.all_reduce(grad)
        grad /= world_size
    return loss.detach(), grads


def _both_dtypes(rank: int, world_size: int, image_all: torch.Tensor, text_all: torch.Tensor):
    return {dtype: _rank_loss_and_engine_grads(rank, world_size, image_all, text_all, dtype) for dtype in (torch.float64, torch.float32)}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_match_full_batch_loss_and_gradients():
    world_size = 2
    image, text = _embeddings(world_size * LOCAL_BATCH)
    ref_loss, ref_grads = _reference_loss_and_grads(image, text)
    per_rank = run_distributed(_both_dtypes, world_size=world_size, args=(image, text))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        losses = [result[dtype][0] for result in per_rank]
        mean_loss = sum(loss.item() for loss in losses) / world_size
        assert abs(mean_loss - ref_loss.item()) <= tol, f"{dtype}: mean of rank losses {mean_loss} vs full-batch {ref_loss.item()} (tol {tol})"
        for rank, result in enumerate(per_rank):
            for name, got, ref in zip(("image", "text", "logit_scale"), result[dtype][1], ref_grads):
                # Reference: autograd of the single-process B×B float64 loss; no world_size factor left.
                torch.testing.assert_close(
                    got.double(), ref, rtol=0, atol=tol, msg=f"{dtype} rank {rank}: rank-averaged {name} grad vs full-batch grad (tol {tol})"
                )


def test_build_loss():
    assert isinstance(build_loss(LossConfig(impl="gather")), GatherClipLoss)
    with pytest.raises(ValueError, match="loss.impl: unknown implementation 'bogus'"):
        build_loss(LossConfig(impl="bogus"))
