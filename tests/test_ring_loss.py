"""The ring CLIP loss against the single-process full-batch loss and against GatherClipLoss."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.distributed as dist
from conftest import run_distributed
from test_loss import LOCAL_BATCH, SCALE, _embeddings, _reference_loss_and_grads

from clipdist.config import LossConfig
from clipdist.losses import GatherClipLoss, RingClipLoss, SigLipLoss, build_loss

# Neither divides LOCAL_BATCH, so every block ends in a short tile; 4096 is one tile per block.
CHUNK_SIZES = (2, 3, 4096)
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_NAMES = ("image", "text", "logit_scale")


def engine_step(rank: int, world_size: int, loss: Callable, image_all: torch.Tensor, text_all: torch.Tensor, dtype: torch.dtype, scalars: tuple[float, ...]):
    """One loss/backward as the engine sees it (see test_loss._rank_loss_and_engine_grads): the full
    embedding tables and the scalar parameters are replicated, rank r's forward takes its rows, and
    the parameter gradients are averaged over ranks afterwards."""
    image_param = image_all.to(dtype, copy=True).requires_grad_()
    text_param = text_all.to(dtype, copy=True).requires_grad_()
    scalar_params = [torch.tensor([value], dtype=dtype, requires_grad=True) for value in scalars]
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    value = loss(image_param[rows], text_param[rows], *scalar_params)
    value.backward()
    grads = [image_param.grad, text_param.grad, *(p.grad for p in scalar_params)]
    if dist.is_initialized():
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world_size
    return value.detach(), grads


def assert_matches(per_rank: list, ref_loss: torch.Tensor, ref_grads: list[torch.Tensor], tol: float, names: tuple[str, ...], what: str) -> None:
    """per_rank: (loss, averaged grads) per rank. The mean rank loss is the full-batch loss, and
    every rank's averaged gradients equal the full-batch gradients (no world_size factor left)."""
    mean_loss = sum(loss.item() for loss, _ in per_rank) / len(per_rank)
    assert abs(mean_loss - ref_loss.item()) <= tol, f"{what}: mean of rank losses {mean_loss} vs reference {ref_loss.item()} (tol {tol})"
    for rank, (_, grads) in enumerate(per_rank):
        for name, got, ref in zip(names, grads, ref_grads, strict=True):
            torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=tol, msg=f"{what} rank {rank}: rank-averaged {name} grad vs reference (tol {tol})")


def _ring_and_gather(rank: int, world_size: int, image_all: torch.Tensor, text_all: torch.Tensor) -> dict:
    results = {}
    for dtype in TOLERANCES:
        for chunk_size in CHUNK_SIZES:
            results["ring", dtype, chunk_size] = engine_step(rank, world_size, RingClipLoss(chunk_size=chunk_size), image_all, text_all, dtype, (SCALE,))
        results["gather", dtype] = engine_step(rank, world_size, GatherClipLoss(), image_all, text_all, dtype, (SCALE,))
    return results


def test_single_process_without_group_matches_reference():
    image, text = _embeddings(LOCAL_BATCH)
    ref_loss, ref_grads = _reference_loss_and_grads(image, text)
    for dtype, tol in TOLERANCES.items():
        for chunk_size in (1, *CHUNK_SIZES):
            got = engine_step(0, 1, RingClipLoss(chunk_size=chunk_size), image, text, dtype, (SCALE,))
            # Reference: autograd of clip_loss_reference (float64, full B×B).
            assert_matches([got], ref_loss, ref_grads, tol, GRAD_NAMES, f"{dtype} chunk {chunk_size}")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ring_matches_full_batch_and_gather(world_size: int):
    image, text = _embeddings(world_size * LOCAL_BATCH, seed=world_size)
    ref_loss, ref_grads = _reference_loss_and_grads(image, text)
    per_rank = run_distributed(_ring_and_gather, world_size=world_size, args=(image, text))
    for dtype, tol in TOLERANCES.items():
        for chunk_size in CHUNK_SIZES:
            ring = [result["ring", dtype, chunk_size] for result in per_rank]
            # Reference: autograd of clip_loss_reference (float64, full B×B), rank-averaged ring grads.
            assert_matches(ring, ref_loss, ref_grads, tol, GRAD_NAMES, f"ring {dtype} chunk {chunk_size} world {world_size}")
            # Reference: GatherClipLoss, rank by rank: the ring is a drop-in, per-rank values included.
            for rank, result in enumerate(per_rank):
                gather_loss, gather_grads = result["gather", dtype]
                assert_matches([ring[rank]], gather_loss, gather_grads, tol, GRAD_NAMES, f"ring vs gather {dtype} chunk {chunk_size} rank {rank}")


def test_half_precision_inputs_score_in_float32():
    image, text = (t.to(torch.bfloat16).requires_grad_() for t in _embeddings(LOCAL_BATCH))
    scale = torch.tensor([SCALE], dtype=torch.float32, requires_grad=True)
    loss = RingClipLoss(chunk_size=2)(image, text, scale)
    loss.backward()
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}, expected float32 (bf16 promoted)"
    assert (image.grad.dtype, text.grad.dtype, scale.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32), "grads keep their input's dtype"


def test_bad_input_is_rejected():
    image, text = _embeddings(LOCAL_BATCH)
    scale = torch.tensor([SCALE], dtype=torch.float64)
    with pytest.raises(ValueError, match="differ in shape"):
        RingClipLoss()(image, text[:-1], scale)
    with pytest.raises(ValueError, match="loss.chunk_size must be >= 1, got 0"):
        RingClipLoss(chunk_size=0)(image, text, scale)


def test_build_loss_new_impls():
    ring, siglip = build_loss(LossConfig(impl="ring")), build_loss(LossConfig(impl="siglip"))
    assert isinstance(ring, RingClipLoss) and isinstance(siglip, SigLipLoss)
    assert ring.chunk_size == siglip.chunk_size == 4096, "chunk_size defaults to 4096 while LossConfig has no such field"
    with pytest.raises(ValueError, match=r"loss.impl: unknown implementation 'bogus', expected one of \['gather', 'ring', 'siglip'\]"):
        build_loss(LossConfig(impl="bogus"))
