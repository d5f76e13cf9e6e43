"""Text tower (CLIP paper, section 2.4): a causal transformer over BPE tokens whose feature is
the final-layer activation at the end-of-text token, projected to the joint embedding space.
Parameter names follow OpenAI's (``token_embedding``, ``transformer``, ``ln_final`` ...)."""

from __future__ import annotations

import torch
from torch import nn

from clipdist.config import TextConfig
from clipdist.models.vit import Transformer


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, *, act: str):
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        # Causal: a token sees only those before it, so the EOT token summarises the whole
        # caption and padding after it cannot change the result.
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, causal=True, act=act)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI's ``initialize_parameters`` for the text tower: residual-branch outputs are
        scaled down by sqrt(2 * layers) (GPT-2 style)."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.transformer.grad_checkpointing = enabled

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [batch, length <= context_length] ids, padded with 0 after the EOT token."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x))
        # EOT has the largest id in the vocabulary, so argmax finds it in every row.
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return eot @ self.text_projection
