"""The single-process CLIP loss over the whole global batch: the definition every
distributed implementation must reproduce, loss and gradients alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss_reference(image_emb_all: torch.Tensor, text_emb_all: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric cross-entropy over the full [B, B] similarity matrix, computed in float64.

    Returns a float64 scalar; autograd flows back to the inputs in their own dtype.
    """
    image = image_emb_all.double()
    text = text_emb_all.double()
    scale = logit_scale.double() if isinstance(logit_scale, torch.Tensor) else logit_scale
    logits_per_image = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def siglip_loss_reference(
    image_emb_all: torch.Tensor, text_emb_all: torch.Tensor, logit_scale: torch.Tensor | float, logit_bias: torch.Tensor | float
) -> torch.Tensor:
    """SigLIP's sigmoid loss over the full [B, B] matrix, computed in float64:
    -(1/B) * sum_ij log sigmoid(label_ij * (scale * image_i . text_j + bias)), label +1 on the
    diagonal and -1 elsewhere (Zhai et al. 2023 normalise by the batch, not the B^2 pairs).

    Returns a float64 scalar; autograd flows back to the inputs in their own dtype.
    """
    image = image_emb_all.double()
    text = text_emb_all.double()
    scale = logit_scale.double() if isinstance(logit_scale, torch.Tensor) else logit_scale
    bias = logit_bias.double() if isinstance(logit_bias, torch.Tensor) else logit_bias
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(image.shape[0], dtype=torch.float64, device=image.device) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]
