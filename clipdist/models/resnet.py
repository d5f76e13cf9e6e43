"""OpenAI's ModifiedResNet image tower (CLIP paper, section 2.4).

Three changes to ResNet-D: a stem of three 3x3 convolutions with an average pool instead of a
max pool; anti-aliased strided blocks (an average pool before the stride instead of a strided
convolution); and attention pooling — one query, the mean of the final feature map, attends
over all positions — in place of global average pooling. Parameter names follow OpenAI's.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipdist.config import VisionConfig


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # Every convolution has stride 1; a stride > 1 is an average pool after the 3x3 conv.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # The pool is named "-1" so the conv and norm keep OpenAI's keys "downsample.0/1".
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean feature over all ``spatial**2`` positions."""

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"attention pool width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial**2 + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [batch, H*W, width]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        batch, tokens, width = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x[:, :1])), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v)  # [batch, heads, 1, head_width]
        return self.c_proj(y.transpose(1, 2).reshape(batch, width))


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm that leaves its running statistics alone. Checkpointing runs a block's forward
    twice; the recomputation must not move the running mean/var (or the batch count) again.
    Momentum 0 keeps the kernel and the tensors it saves for backward exactly as in the first
    forward, which checkpointing checks; in training mode the output uses batch statistics."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, batches) in zip(norms, saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(batches)


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size % 32 != 0:
            raise ValueError(f"model.vision.image_size {cfg.image_size} must be a multiple of 32 for the ResNet tower")
        if len(cfg.stage_blocks) != 4:
            raise ValueError(f"model.vision.stage_blocks must list 4 stages, got {list(cfg.stage_blocks)}")
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_stage(width, cfg.stage_blocks[0])
        self.layer2 = self._make_stage(width * 2, cfg.stage_blocks[1], stride=2)
        self.layer3 = self._make_stage(width * 4, cfg.stage_blocks[2], stride=2)
        self.layer4 = self._make_stage(width * 8, cfg.stage_blocks[3], stride=2)

        features = width * 8 * Bottleneck.expansion
        self.attnpool = AttentionPool2d(cfg.image_size // 32, features, features // cfg.head_width, embed_dim)
        self.grad_checkpointing = False
        self.init_parameters()

    def _make_stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        stage = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        stage += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def init_parameters(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        # Zero-init the last norm of every residual branch: each block starts as the identity.
        for stage in self.trunk_blocks():
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.grad_checkpointing = enabled

    def trunk_blocks(self) -> List[nn.Module]:
        """The stages that LiT's ``lock_image_unlocked_blocks`` counts from the top."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def head_parameters(self) -> List[nn.Parameter]:
        """What follows the stages; trainable whenever any stage is."""
        return list(self.attnpool.parameters())

    def _run_block(self, block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return block(x)
        if torch.compiler.is_compiling():
            # A compiled graph applies BatchNorm's buffer updates once, after the forward; the
            # recomputation in its backward is functional. (Dynamo cannot trace the context_fn.)
            return checkpoint(block, x, use_reentrant=False)
        return checkpoint(block, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), running_stats_frozen(block)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        for stage in self.trunk_blocks():
            for block in stage:
                x = self._run_block(block, x)
        return self.attnpool(x)
