"""Vision Transformer image tower (CLIP paper, section 2.4), and the residual attention
blocks it shares with the text tower.

Parameter names and shapes follow OpenAI's release (``conv1``, ``class_embedding``,
``transformer.resblocks.N.attn.in_proj_weight`` ...), so their weights load without renaming.
Activations are batch-first ``[batch, tokens, width]``; OpenAI's code is sequence-first, which
changes no parameter.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipdist.config import VisionConfig


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI trained CLIP with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# model.act (clipdist.config.ACTIVATIONS) -> the MLP activation. Neither has parameters: weights
# trained with one load into the other without complaint, and compute something else
# (clipdist.models.pretrained guards this).
ACTIVATION_MODULES = {"quick_gelu": QuickGELU, "gelu": nn.GELU}  # nn.GELU: exact (erf), as open_clip's


def activation(name: str) -> nn.Module:
    if name not in ACTIVATION_MODULES:
        raise ValueError(f"model.act: expected one of {list(ACTIVATION_MODULES)}, got {name!r}")
    return ACTIVATION_MODULES[name]()


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout
    (packed ``in_proj_weight``/``in_proj_bias`` for q, k, v, then ``out_proj``)."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's defaults; OpenAI keeps them for the vision tower.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(batch, tokens, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False, *, act: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", activation(act)), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks; the trunk of both towers."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False, *, act: str):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, causal, act=act) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Keep only the block inputs; recompute the block's activations in backward.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class PatchDropout(nn.Module):
    """FLIP (Li et al. 2023): in training, each image keeps a random subset of its patch tokens,
    the same number for every image so that shapes stay static; the class token always stays.
    Attention cost falls with the square of the kept share. Eval sees every patch.

    Draws from torch's global RNG, so ``torch.manual_seed`` (and a checkpointed RNG state)
    reproduces the subsets. Has no parameters: the state dict is that of a plain ViT."""

    def __init__(self, prob: float):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"model.patch_dropout: must be in [0, 1), got {prob}")
        self.prob = prob

    def kept_patches(self, patches: int) -> int:
        return max(1, int(patches * (1.0 - self.prob)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, 1 + patches, width], class token first -> [batch, 1 + kept, width]."""
        if not self.training or self.prob == 0.0:
            return x
        batch, tokens, width = x.shape
        keep = self.kept_patches(tokens - 1)
        # The top-k of i.i.d. uniform scores is a uniformly random subset (OpenCLIP draws the same way).
        kept = torch.rand(batch, tokens - 1, device=x.device).topk(keep, dim=-1).indices + 1
        patches = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([x[:, :1], patches], dim=1)


class VisionTransformer(nn.Module):
    """Patchify, prepend a class token, transform, project the class token to ``embed_dim``."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, patch_dropout: float = 0.0, *, act: str):
        super().__init__()
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(f"model.vision.patch_size {cfg.patch_size} does not divide image_size {cfg.image_size}")
        width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.patch_dropout = PatchDropout(patch_dropout)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, width // cfg.head_width, cfg.mlp_ratio, act=act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.transformer.grad_checkpointing = enabled

    def trunk_blocks(self) -> List[nn.Module]:
        """The blocks that LiT's ``lock_image_unlocked_blocks`` counts from the top."""
        return list(self.transformer.resblocks)

    def head_parameters(self) -> List[nn.Parameter]:
        """What follows the blocks; trainable whenever any block is."""
        return [*self.ln_post.parameters(), self.proj]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [batch, grid*grid, width]
        class_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([class_token, x], dim=1) + self.positional_embedding.to(x.dtype)
        # After the positional embedding, so that every kept patch keeps its position (as OpenCLIP).
        x = self.transformer(self.ln_pre(self.patch_dropout(x)))
        return self.ln_post(x[:, 0]) @ self.proj
