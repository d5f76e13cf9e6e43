"""SigLIP's sigmoid loss (Zhai et al. 2023) over the global batch, chunked over a ring of ranks.

Every image-text pair is an independent binary problem, so the loss is a plain sum over
[b, chunk_size] tiles: no log-sum-exp to carry, nothing per row to save. Only the text
embeddings travel (image rows stay local and see every text once); in the backward the text
gradients travel on around the ring with their block, back to its owner.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clipdist.distributed import get_rank
from clipdist.losses.ring import check_pair, column_tiles, compute_dtype, ring_blocks, ring_reduce_grad


def _negate_positives(tile: torch.Tensor, cols: slice, is_own_block: bool) -> torch.Tensor:
    """Negate, in place, the entries of a [b, c] tile of our own block's columns ``cols`` that
    lie on the global diagonal (label +1; -1 elsewhere): turns logit into -label * logit, and
    sigmoid(-label * logit) into -label * sigmoid(-label * logit), the gradient wrt the logit."""
    if is_own_block:
        rows = torch.arange(cols.start, cols.stop, device=tile.device)
        tile[rows, rows - cols.start] *= -1
    return tile


class _SigLipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, group, chunk_size: int):
        dtype = compute_dtype(image.dtype)
        b, rank = image.shape[0], get_rank(group)
        scale, bias = logit_scale.to(dtype).reshape(()), logit_bias.to(dtype).reshape(())
        image_local = image.to(dtype)
        total = torch.zeros((), dtype=dtype, device=image.device)
        for owner, text_block in ring_blocks(text, group):
            for cols in column_tiles(b, chunk_size):
                logits = scale * image_local @ text_block[cols].to(dtype).T + bias
                # -log sigmoid(label * logit) = softplus(-label * logit)
                total = total + F.softplus(_negate_positives(logits, cols, owner == rank)).sum()
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.group, ctx.chunk_size = group, chunk_size
        return total / b

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        dtype = compute_dtype(image.dtype)
        b, rank = image.shape[0], get_rank(ctx.group)
        scale, bias = logit_scale.to(dtype).reshape(()), logit_bias.to(dtype).reshape(())
        image_local = image.to(dtype)
        coef_logit = grad_loss.to(dtype) / b
        coef_emb = coef_logit * scale
        grad_image = torch.zeros_like(image_local)
        grad_logit_times_similarity = torch.zeros((), dtype=dtype, device=image.device)
        grad_logit_sum = torch.zeros((), dtype=dtype, device=image.device)

        def accumulate(owner: int, text_block: torch.Tensor, grad_block: torch.Tensor) -> None:
            nonlocal grad_logit_times_similarity, grad_logit_sum
            for cols in column_tiles(b, ctx.chunk_size):
                text_cols = text_block[cols].to(dtype)
                similarity = image_local @ text_cols.T
                negated = _negate_positives(scale * similarity + bias, cols, owner == rank)
                # d softplus(-label * logit) / d logit = -label * sigmoid(-label * logit)
                grad_logit = _negate_positives(torch.sigmoid(negated), cols, owner == rank)
                grad_image.add_(grad_logit @ text_cols)
                # Scaled here, by our own grad_loss, because the owner applies nothing more.
                grad_block[cols] += coef_emb * (grad_logit.T @ image_local)
                grad_logit_times_similarity = grad_logit_times_similarity + (grad_logit * similarity).sum()
                grad_logit_sum = grad_logit_sum + grad_logit.sum()

        grad_text = ring_reduce_grad(text, accumulate, dtype, ctx.group)
        grad_image = coef_emb * grad_image
        grad_scale = coef_logit * grad_logit_times_similarity
        grad_bias = coef_logit * grad_logit_sum
        return (
            grad_image.to(image.dtype),
            grad_text.to(text.dtype),
            grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype),
            grad_bias.reshape(logit_bias.shape).to(logit_bias.dtype),
            None,
            None,
        )


class SigLipLoss(nn.Module):
    """SigLIP sigmoid loss over the global batch of B = world_size * b pairs:

        L_full = -(1/B) * sum_{i,j < B} log sigmoid(label_ij * (scale * image_i . text_j + bias))

    with label +1 for the matching pair (the global diagonal) and -1 for every other pair.

    Rank r returns the sum over its b image rows (against all B texts), divided by b, so the
    full loss is the mean of the rank losses. Gradient convention, as GatherClipLoss: rank r's
    gradient for its own text embeddings is the SUM over ranks q of dL_q/dtext_r, and for its
    image embeddings, logit_scale and logit_bias its own dL_r; the engine's rank average of
    parameter gradients is then exactly dL_full. Every rank must pass the same b.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, chunk_size: int = 4096) -> None:
        super().__init__()
        self.group = group
        self.chunk_size = chunk_size

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb: [b, d], normalised. logit_scale: (1,), already exp'd. logit_bias: (1,)."""
        check_pair(image_emb, text_emb, self.chunk_size)
        return _SigLipLoss.apply(image_emb, text_emb, logit_scale, logit_bias, self.group, self.chunk_size)
