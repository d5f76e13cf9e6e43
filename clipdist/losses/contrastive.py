"""Contrastive losses that see the global batch while each rank holds only its local one."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clipdist.config import LossConfig
from clipdist.distributed import all_gather_with_grad, get_rank
from clipdist.losses.ring import RingClipLoss, check_same_shape, compute_dtype
from clipdist.losses.siglip import SigLipLoss


class GatherClipLoss(nn.Module):
    """CLIP loss over the global batch: all-gather both embeddings, score only the local rows.

    Rank r holds rows [r*b, (r+1)*b) of the global batch and computes
        logits_per_image = scale * image_local @ text_all.T     [b, B]
        logits_per_text  = scale * text_local  @ image_all.T    [b, B]
    and the mean cross-entropy over its b rows, so the full-batch loss is the mean of the rank
    losses. Gradient scaling: the gather's backward sums over ranks, so rank r's gradient for its
    own embeddings is sum_q dL_q/de = world_size * dL_full/de. The engine (DeepSpeed, DDP)
    averages parameter gradients over ranks, which divides that factor out again: the averaged
    gradient is exactly the gradient of the full [B, B] loss (tests/test_loss.py checks this).
    logit_scale is not gathered: each rank's dL_r/dscale, averaged, is dL_full/dscale.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb: [b, d], normalised. logit_scale: scalar or (1,), already exp'd and clamped."""
        check_same_shape(image_emb, text_emb)
        image_all = all_gather_with_grad(image_emb, self.group)
        text_all = all_gather_with_grad(text_emb, self.group)
        # Gather in the training dtype (half the bytes), score in at least float32.
        dtype = compute_dtype(image_emb.dtype)
        image_local, text_local = image_emb.to(dtype), text_emb.to(dtype)
        image_all, text_all = image_all.to(dtype), text_all.to(dtype)
        scale = logit_scale.to(dtype).reshape(())
        logits_per_image = scale * image_local @ text_all.T
        logits_per_text = scale * text_local @ image_all.T
        b = image_emb.shape[0]
        labels = torch.arange(b, device=image_emb.device) + get_rank(self.group) * b
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def build_loss(cfg: LossConfig, group: dist.ProcessGroup | None = None) -> nn.Module:
    builders = {
        "gather": lambda: GatherClipLoss(group),
        "ring": lambda: RingClipLoss(group, cfg.chunk_size),
        "siglip": lambda: SigLipLoss(group, cfg.chunk_size),
    }
    if cfg.impl not in builders:
        raise ValueError(f"loss.impl: unknown implementation {cfg.impl!r}, expected one of {list(builders)}")
    return builders[cfg.impl]()
