"""CLIP loss over the global batch without an all-gather: every rank's embeddings travel a ring
of ranks and the logits are scored in [b, chunk_size] tiles, so no rank ever holds a [b, B]
logit matrix or the [B, d] gathered embeddings. The backward recomputes the tiles; the gradient
a rank's loss puts on a visiting block travels on around the ring with that block, back to the
block's owner.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from clipdist.distributed import get_rank, get_world_size

# A block and the gradient travelling with it are in flight at the same time, on the same link.
_BLOCK_TAG = 0
_GRAD_TAG = 1


class _RingPass:
    """Send ``tensor`` to the next rank and receive the previous rank's tensor, asynchronously."""

    def __init__(self, tensor: torch.Tensor, group: dist.ProcessGroup | None, tag: int) -> None:
        world_size, rank = get_world_size(group), get_rank(group)
        self.sent = tensor.contiguous()  # must outlive the send
        self.received = torch.empty_like(self.sent)
        # Batched, so that NCCL posts the send and the receive together: two separate calls queue
        # on one stream, and at world size 2 both ranks' sends would wait for receives behind them.
        self.works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, self.sent, group=group, tag=tag, group_peer=(rank + 1) % world_size),
                dist.P2POp(dist.irecv, self.received, group=group, tag=tag, group_peer=(rank - 1) % world_size),
            ]
        )

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


def ring_blocks(block: torch.Tensor, group: dist.ProcessGroup | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (owner rank, block) for every rank's block, our own first; the next block's transfer
    overlaps the caller's work on the current one. Every rank must pass the same shape."""
    world_size, rank = get_world_size(group), get_rank(group)
    for step in range(world_size):
        transfer = _RingPass(block, group, _BLOCK_TAG) if step < world_size - 1 else None
        yield (rank - step) % world_size, block
        if transfer is not None:
            block = transfer.wait()


def ring_reduce_grad(
    block: torch.Tensor,
    accumulate: Callable[[int, torch.Tensor, torch.Tensor], None],
    grad_dtype: torch.dtype,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Sum over ranks of the gradient each rank's loss puts on our ``block``.

    Every rank's block visits every rank; there ``accumulate(owner, block, grad)`` adds that rank's
    contribution into ``grad`` (shaped like the block), which then travels on with the block. After
    the last visit one more hop brings each gradient home. Same result as all_gather_with_grad's
    backward (an all_reduce of the full gradient), but only one block and one gradient in flight.
    """
    world_size = get_world_size(group)
    grad = torch.zeros(block.shape, dtype=grad_dtype, device=block.device)
    for owner, visiting in ring_blocks(block, group):
        accumulate(owner, visiting, grad)
        if world_size > 1:
            grad = _RingPass(grad, group, _GRAD_TAG).wait()
    return grad


def column_tiles(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits of magnitude ~100 keep barely two significant digits: blocks travel in the
    # training dtype (half the bytes), tiles are scored in at least float32.
    return torch.promote_types(dtype, torch.float32)


def check_same_shape(image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")


def check_pair(image_emb: torch.Tensor, text_emb: torch.Tensor, chunk_size: int) -> None:
    check_same_shape(image_emb, text_emb)
    if chunk_size < 1:
        raise ValueError(f"loss.chunk_size must be >= 1, got {chunk_size}")


class _RingClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, group, chunk_size: int) -> torch.Tensor:
        dtype = compute_dtype(image.dtype)
        b = image.shape[0]
        scale = logit_scale.to(dtype).reshape(())
        image_local, text_local = image.to(dtype), text.to(dtype)
        # Online log-sum-exp over every column of the global batch, in both directions.
        lse_image = image_local.new_full((b,), float("-inf"))
        lse_text = image_local.new_full((b,), float("-inf"))
        for _, block in ring_blocks(torch.stack([image, text]), group):
            for cols in column_tiles(b, chunk_size):
                image_cols, text_cols = block[0, cols].to(dtype), block[1, cols].to(dtype)
                lse_image = torch.logaddexp(lse_image, torch.logsumexp(scale * image_local @ text_cols.T, dim=1))
                lse_text = torch.logaddexp(lse_text, torch.logsumexp(scale * text_local @ image_cols.T, dim=1))
        positive = scale * (image_local * text_local).sum(dim=1)
        ctx.save_for_backward(image, text, logit_scale, lse_image, lse_text)
        ctx.group, ctx.chunk_size = group, chunk_size
        # Mean over our rows of (CE_image_row + CE_text_row) / 2.
        return (lse_image + lse_text - 2 * positive).sum() / (2 * b)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        image, text, logit_scale, lse_image, lse_text = ctx.saved_tensors
        dtype, b = lse_image.dtype, image.shape[0]
        scale = logit_scale.to(dtype).reshape(())
        image_local, text_local = image.to(dtype), text.to(dtype)
        # d loss / d logit = coef_logit * (softmax - onehot); the embeddings see one more factor of scale.
        coef_logit = grad_loss.to(dtype) / (2 * b)
        coef_emb = coef_logit * scale
        grad_image_rows = torch.zeros_like(image_local)
        grad_text_rows = torch.zeros_like(text_local)
        softmax_times_similarity = torch.zeros((), dtype=dtype, device=image.device)

        def accumulate(owner: int, block: torch.Tensor, grad_block: torch.Tensor) -> None:
            nonlocal softmax_times_similarity
            for cols in column_tiles(b, ctx.chunk_size):
                image_cols, text_cols = block[0, cols].to(dtype), block[1, cols].to(dtype)
                similarity_image = image_local @ text_cols.T
                similarity_text = text_local @ image_cols.T
                softmax_image = torch.exp(scale * similarity_image - lse_image[:, None])
                softmax_text = torch.exp(scale * similarity_text - lse_text[:, None])
                grad_image_rows.add_(softmax_image @ text_cols)
                grad_text_rows.add_(softmax_text @ image_cols)
                # Scaled here, by our own grad_loss, because the owner applies nothing more.
                grad_block[1, cols] += coef_emb * (softmax_image.T @ image_local)
                grad_block[0, cols] += coef_emb * (softmax_text.T @ text_local)
                softmax_times_similarity = softmax_times_similarity + (softmax_image * similarity_image).sum() + (softmax_text * similarity_text).sum()

        grad_own = ring_reduce_grad(torch.stack([image, text]), accumulate, dtype, ctx.group)
        # The positives (the local diagonal) appear once as a row and once as a column.
        grad_image = coef_emb * (grad_image_rows - 2 * text_local) + grad_own[0]
        grad_text = coef_emb * (grad_text_rows - 2 * image_local) + grad_own[1]
        grad_scale = coef_logit * (softmax_times_similarity - 2 * (image_local * text_local).sum())
        return grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype), None, None


class RingClipLoss(nn.Module):
    """CLIP loss over the global batch with GatherClipLoss's value and gradients (a drop-in), in
    O(b * chunk_size) memory for the logits instead of O(b * B).

    Rank r returns the mean over its b rows of (CE_image_row + CE_text_row) / 2, so the full-batch
    loss is the mean of the rank losses. Gradient convention, as GatherClipLoss: rank r's gradient
    for its own embeddings is the SUM over ranks q of dL_q/de_r (world_size * dL_full/de_r), which
    the engine's rank average of parameter gradients turns into dL_full/de_r; the logit_scale
    gradient is rank r's own dL_r/dscale, whose rank average is dL_full/dscale.

    Each of the world_size - 1 ring steps moves one rank's [2, b, d] embeddings (forward) or those
    and their float32 gradient (backward) to the next rank, overlapped with scoring the current
    block. Every rank must pass the same b.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, chunk_size: int = 4096) -> None:
        super().__init__()
        self.group = group
        self.chunk_size = chunk_size

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb: [b, d], normalised. logit_scale: scalar or (1,), already exp'd and clamped."""
        check_pair(image_emb, text_emb, self.chunk_size)
        return _RingClipLoss.apply(image_emb, text_emb, logit_scale, self.group, self.chunk_size)
