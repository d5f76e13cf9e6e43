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


def exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: int, group) -> list:
    """Post a send to ``dst`` and a receive from ``src`` together; returns the works. Batched, so
    that NCCL posts both at once: two separate calls queue on one stream, and at world size 2 both
    ranks' sends would wait for receives queued behind them."""
    return dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, send, group=group, tag=tag, group_peer=dst),
            dist.P2POp(dist.irecv, recv, group=group, tag=tag, group_peer=src),
        ]
    )


class _RingPass:
    """Send ``tensor`` to the next rank and receive the previous rank's tensor, asynchronously."""

    def __init__(self, tensor: torch.Tensor, group: dist.ProcessGroup | None, tag: int) -> None:
        world_size, rank = get_world_size(group), get_rank(group)
        self.sent = tensor.contiguous()  # must outlive the send
        self.received = torch.empty_like(self.sent)
        self.works = exchange(self.sent, (rank + 1) % world_size, self.received, (rank - 1) % world_size, tag, group)

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


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _RingClipLoss(torch.autograd.Function):
    """Rank r scores only its own rows of the global logits, L[r, :] = scale · I_r @ T_allᵀ, one
    [b, chunk] tile at a time as the text blocks travel the ring; each tile serves both directions:

    * image → text: a row's log-sum-exp runs along the row, online over the tiles;
    * text → image: column j's log-sum-exp runs down the column, over every rank's rows, so each
      rank keeps per-column (max, sum-exp) partials for all B columns, combined by two all-reduces
      of B floats.

    The backward recomputes every tile once and applies both softmaxes to it: 4 passes of
    [b, B, d] matrix products (the gathered loss does 6), and only text blocks travel. A tile's
    column gradient belongs to the text block's owner and is sent straight home.
    """

    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, group, chunk_size: int) -> torch.Tensor:
        world_size, rank = get_world_size(group), get_rank(group)
        dtype, b = compute_dtype(image.dtype), image.shape[0]
        scale = logit_scale.to(dtype).reshape(())
        image_local = image.to(dtype)
        lse_row = image_local.new_full((b,), float("-inf"))
        column_max = image_local.new_empty((world_size, b))
        column_sum = image_local.new_empty((world_size, b))
        for owner, block in ring_blocks(text, group):
            for cols in column_tiles(b, chunk_size):
                tile = (image_local @ block[cols].to(dtype).T).mul_(scale)
                tile_max = tile.amax(dim=0)
                column_max[owner, cols] = tile_max
                column_sum[owner, cols] = torch.exp(tile - tile_max).sum(dim=0)
                row_max = tile.amax(dim=1, keepdim=True)
                lse_row = torch.logaddexp(lse_row, row_max.squeeze(1) + tile.sub_(row_max).exp_().sum(dim=1).log_())
        # Each column's log-sum-exp over every rank's rows: a common max, then the rescaled sums.
        global_max = _all_reduce(column_max.clone(), dist.ReduceOp.MAX, group)
        column_sum.mul_(torch.exp(column_max - global_max))
        lse_column = global_max + _all_reduce(column_sum, dist.ReduceOp.SUM, group).log_()
        positive = scale * torch.linalg.vecdot(image_local, text.to(dtype))
        ctx.save_for_backward(image, text, logit_scale, lse_row, lse_column)
        ctx.group, ctx.chunk_size = group, chunk_size
        # Mean over our rows of (CE_image_row + CE_text_row) / 2; our text rows are our columns.
        return (lse_row.sum() + lse_column[rank].sum() - 2 * positive.sum()) / (2 * b)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        image, text, logit_scale, lse_row, lse_column = ctx.saved_tensors
        group, chunk_size = ctx.group, ctx.chunk_size
        world_size, rank = get_world_size(group), get_rank(group)
        dtype, b = lse_row.dtype, image.shape[0]
        scale = logit_scale.to(dtype).reshape(())
        image_local, text_local = image.to(dtype), text.to(dtype)
        # A column's softmax belongs to its owner's loss, so its upstream gradient is the owner's.
        coef = _all_gather_scalars(grad_loss.to(dtype).reshape(1), group) / (2 * b)
        grad_image = torch.zeros_like(image_local)
        grad_text = torch.zeros_like(text_local)
        row_dot = torch.zeros((), dtype=dtype, device=image.device)  # Σ P_row · similarity, our rows
        column_dot = image_local.new_zeros(world_size)  # Σ P_column · similarity, by column owner
        for step, (owner, block) in enumerate(ring_blocks(text, group)):
            pending = None
            for cols in column_tiles(b, chunk_size):
                text_cols = block[cols].to(dtype)
                similarity = image_local @ text_cols.T
                p_row = similarity.mul(scale).sub_(lse_row[:, None]).exp_()
                p_column = similarity.mul(scale).sub_(lse_column[owner, cols][None, :]).exp_()
                row_dot = row_dot + torch.dot(p_row.view(-1), similarity.view(-1))
                column_dot[owner] += torch.dot(p_column.view(-1), similarity.view(-1))
                del similarity
                # d Σ_q g_q L_q / d similarity = scale · (g_r P_row + g_owner P_column) / (2b)
                p_row.mul_(coef[rank] * scale).add_(p_column.mul_(coef[owner] * scale))
                del p_column
                grad_image.addmm_(p_row, text_cols)
                column_grad = p_row.T @ image_local
                del p_row
                if step == 0:
                    grad_text[cols] += column_grad
                    continue
                received = torch.empty_like(column_grad)
                works = exchange(column_grad, owner, received, (rank + step) % world_size, _GRAD_TAG, group)
                if pending is not None:
                    _add_received(pending, grad_text)
                pending = (works, column_grad, received, cols)  # column_grad must outlive its send
            if pending is not None:
                _add_received(pending, grad_text)
        # The positives (the local diagonal) appear once as a row and once as a column.
        grad_image.addcmul_(text_local, coef[rank] * scale, value=-2)
        grad_text.addcmul_(image_local, coef[rank] * scale, value=-2)
        column_dot = _all_reduce(column_dot, dist.ReduceOp.SUM, group)
        grad_scale = coef[rank] * (row_dot + column_dot[rank] - 2 * torch.linalg.vecdot(image_local, text_local).sum())
        return grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype), None, None


def _all_gather_scalars(value: torch.Tensor, group) -> torch.Tensor:
    if get_world_size(group) == 1:
        return value
    parts = [torch.empty_like(value) for _ in range(get_world_size(group))]
    dist.all_gather(parts, value.contiguous(), group=group)
    return torch.cat(parts)


def _add_received(pending: tuple, grad_text: torch.Tensor) -> None:
    works, _, received, cols = pending
    for work in works:
        work.wait()
    grad_text[cols] += received


class RingClipLoss(nn.Module):
    """CLIP loss over the global batch with GatherClipLoss's value and gradients (a drop-in),
    never holding a [b, B] logit matrix or the [B, d] gathered embeddings: memory O(b · (d + chunk)).

    Rank r returns the mean over its b rows of (CE_image_row + CE_text_row) / 2, so the full-batch
    loss is the mean of the rank losses. Gradient convention, as GatherClipLoss: rank r's gradient
    for its own embeddings is the SUM over ranks q of dL_q/de_r (world_size * dL_full/de_r), which
    the engine's rank average of parameter gradients turns into dL_full/de_r; the logit_scale
    gradient is rank r's own dL_r/dscale, whose rank average is dL_full/dscale.

    Each of the world_size - 1 ring steps moves one rank's [b, d] text embeddings to the next
    rank, overlapped with scoring the current block; in the backward, column gradients go home
    tile by tile, overlapped with the next tile. Every rank must pass the same b.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, chunk_size: int = 4096) -> None:
        super().__init__()
        self.group = group
        self.chunk_size = chunk_size

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb: [b, d], normalised. logit_scale: scalar or (1,), already exp'd and clamped."""
        check_pair(image_emb, text_emb, self.chunk_size)
        return _RingClipLoss.apply(image_emb, text_emb, logit_scale, self.group, self.chunk_size)
