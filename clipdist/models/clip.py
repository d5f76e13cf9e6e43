"""CLIP (Radford et al., 2021): an image tower and a text tower that map into one embedding
space, plus the learned temperature of the contrastive loss."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from clipdist.config import ModelConfig
from clipdist.models.resnet import ModifiedResNet
from clipdist.models.text import TextTransformer
from clipdist.models.vit import VisionTransformer

# Parameters that weight decay would wrongly pull towards zero: learned lookup tables and the
# temperature. (The optimizer additionally exempts every parameter with ndim < 2.)
_NO_DECAY_SUFFIXES = ("class_embedding", "positional_embedding", "token_embedding.weight", "logit_scale", "logit_bias")


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_size = cfg.vision.image_size
        self.context_length = cfg.text.context_length
        self.max_logit_scale = cfg.max_logit_scale
        self.act = cfg.act  # what load_pretrained checks a checkpoint's activation against
        if cfg.vision.arch == "vit":
            self.visual: nn.Module = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.patch_dropout, act=cfg.act)
        elif cfg.vision.arch == "resnet":  # ReLUs (OpenAI's, open_clip's): model.act acts in the text tower only
            self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim)
        else:
            raise ValueError(f"model.vision.arch: expected 'vit' or 'resnet', got {cfg.vision.arch!r}")
        self.text = TextTransformer(cfg.text, cfg.embed_dim, act=cfg.act)
        # log of the inverse softmax temperature. Shape (1,), not a 0-dim scalar: DeepSpeed's
        # ZeRO partitioning cannot handle 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        # SigLIP's sigmoid loss also learns a bias; the softmax loss is shift-invariant and has none.
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.full((1,), cfg.init_logit_bias))
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each residual block (ViT/text) or Bottleneck (ResNet) in backward."""
        self.visual.set_grad_checkpointing(enabled)
        self.text.set_grad_checkpointing(enabled)

    def lock_image(self, unlocked_blocks: int = 0) -> None:
        """LiT (Zhai et al. 2022): freeze the image tower but its last ``unlocked_blocks`` blocks
        (ViT resblocks, ResNet stages) and, when any is unlocked, the head that follows them; 0
        freezes it all, projection included. Frozen parameters get no gradient and no optimizer
        state (engine.optim.param_groups skips them); frozen modules stay in eval mode (train)."""
        blocks = self.visual.trunk_blocks()
        if not 0 <= unlocked_blocks <= len(blocks):
            raise ValueError(f"model.lock_image_unlocked_blocks: the image tower has {len(blocks)} blocks, got {unlocked_blocks}")
        self.visual.requires_grad_(False)
        if unlocked_blocks:
            for block in blocks[len(blocks) - unlocked_blocks :]:
                block.requires_grad_(True)
            for param in self.visual.head_parameters():
                param.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "CLIP":
        """Also keeps every image-tower module whose parameters are all frozen in eval mode: a
        locked BatchNorm must not move its running statistics (that would change the features
        LiT keeps fixed), and a fully locked ViT sees every patch (no patch dropout)."""
        super().train(mode)
        for module in self.visual.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
        return self

    def compile_towers(self) -> None:
        """torch.compile each tower in place. nn.Module.compile keeps the state dict keys (no
        ``_orig_mod.`` prefix), so checkpoints and exports are those of the eager model."""
        self.visual.compile()
        self.text.compile()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images: [batch, 3, image_size, image_size] -> [batch, embed_dim]."""
        if images.ndim != 4 or tuple(images.shape[-3:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"images have shape {tuple(images.shape)}, expected [batch, 3, {self.image_size}, {self.image_size}]")
        # A fully locked tower records no graph anyway; no_grad also skips its checkpointing.
        trainable = any(p.requires_grad for p in self.visual.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """tokens: [batch, length <= context_length] token ids -> [batch, embed_dim]."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}, expected [batch, <= {self.context_length}]")
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Returns (image_emb, text_emb, logit_scale_exp[, logit_bias]): L2-normalised
        [batch, embed_dim] embeddings, the temperature exp(logit_scale) clamped to
        max_logit_scale, shape (1,), and SigLIP's bias (1,) when the model has one — exactly the
        arguments of the configured loss."""
        # The clamp stops the temperature from growing without bound (paper: capped at 100);
        # its gradient is zero once clamped, so logit_scale stays put there. In float32: a bf16
        # exp(logit_scale) near 100 would be off by up to 0.25, whatever the loss computes in.
        logit_scale_exp = self.logit_scale.float().exp().clamp(max=self.max_logit_scale)
        outputs = (self.encode_image(images), self.encode_text(tokens), logit_scale_exp)
        return outputs if self.logit_bias is None else (*outputs, self.logit_bias)

    def no_weight_decay(self) -> Set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith(_NO_DECAY_SUFFIXES)}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# Entries of OpenAI's released (TorchScript) and open_clip's state dicts that are not weights:
# hyperparameters, and the causal mask, which our text tower builds on the fly.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask")
# Top-level scalars: 0-dim in OpenAI's and open_clip's models, shape (1,) in ours (see CLIP).
_SCALARS = ("logit_scale", "logit_bias")


def openai_key(key: str) -> str:
    """OpenAI / open_clip parameter name -> ours. The image tower matches as is; the text tower
    sits at the top level in OpenAI's and open_clip's ``CLIP`` and under ``text.`` in ours (and
    in open_clip's ``CustomTextCLIP``, whose names are ours already)."""
    if key.startswith(("visual.", "text.")) or key in _SCALARS:
        return key
    return f"text.{key}"


def to_openai_key(key: str) -> str:
    """Ours -> OpenAI / open_clip ``CLIP`` parameter name (the inverse of ``openai_key``)."""
    return key.removeprefix("text.")


def openai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our state dict in OpenAI's / open_clip's layout, with their 0-dim scalars."""
    return {to_openai_key(k): v.reshape(()) if k in _SCALARS else v for k, v in state_dict.items()}


def from_openai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """OpenAI's / open_clip's (``CLIP`` or ``CustomTextCLIP``) state dict in our layout."""
    return {
        openai_key(k): v.reshape(1) if k in _SCALARS else v for k, v in state_dict.items() if k not in _NOT_WEIGHTS
    }


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The first difference between ``state_dict`` and what ``model`` holds, in one line (named
    by our key, with how many more there are), or None when every key and shape matches."""
    expected = model.state_dict()
    # Shapes first: a wrong width or context length is the likeliest mistake, and names it best.
    problems = [
        f"shape of {k}: checkpoint {list(state_dict[k].shape)}, model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems += [f"missing {k} (shape {list(v.shape)})" for k, v in expected.items() if k not in state_dict]
    problems += [f"unexpected {k} (shape {list(v.shape)})" for k, v in state_dict.items() if k not in expected]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def load_openai_state_dict(model: CLIP, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load weights saved by OpenAI's CLIP or open_clip into ``model``. Every parameter and
    buffer must be present and match in shape; otherwise ValueError names the first that does
    not. A SigLIP model keeps its configured bias when the checkpoint has none (a softmax-CLIP
    starting point), and a softmax model ignores a checkpoint's bias (its loss has none)."""
    mapped = from_openai_state_dict(state_dict)
    if model.logit_bias is None:
        mapped.pop("logit_bias", None)
    elif "logit_bias" not in mapped:
        mapped["logit_bias"] = model.logit_bias.detach().clone()
    problem = state_dict_mismatch(model, mapped)
    if problem:
        raise ValueError(f"state dict does not fit the model: {problem}")
    model.load_state_dict(mapped, strict=True)
