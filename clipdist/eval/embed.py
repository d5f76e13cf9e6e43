"""Embedding helpers shared by the evaluations.

Every rank must run the same number of forwards: under ZeRO-3 each forward gathers the
partitioned parameters collectively, so a rank with one batch fewer would hang the others.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from clipdist.distributed import get_rank, get_world_size

Tokenizer = Callable[[list[str], int], torch.Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def rank0_buffers(model: nn.Module) -> Iterator[None]:
    """Evaluate with rank 0's buffers on every rank, then give each rank its own back.

    Data parallel training updates each rank's BatchNorm running statistics from its own
    batches (DeepSpeed does not broadcast buffers), so without this a ResNet tower would embed
    each rank's share of the images differently, and the numbers would depend on the world
    size. Rank 0's buffers are the ones a checkpoint holds."""
    buffers = list(model.buffers())
    if get_world_size() == 1 or not buffers:
        yield
        return
    own = [b.detach().clone() for b in buffers] if get_rank() != 0 else []
    for buffer in buffers:
        dist.broadcast(buffer.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, own):
                buffer.copy_(saved)


def input_dtype(model: nn.Module) -> torch.dtype:
    # DeepSpeed's bf16/fp16 engines hold the module in that dtype, so inputs must match.
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


def gather_sizes(count: int, device: torch.device | str) -> list[int]:
    """Every rank's ``count``, in rank order."""
    world_size = get_world_size()
    if world_size == 1:
        return [count]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([count], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of ``x`` (counts may differ) concatenated in rank order, on every rank;
    and the per-rank counts."""
    sizes = gather_sizes(x.shape[0], x.device)
    if len(sizes) == 1:
        return x, sizes
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    tokenizer_fn: Tokenizer,
    texts: list[str],
    device: torch.device | str,
    context_length: int,
    batch_size: int,
    filler: str = "",
) -> torch.Tensor:
    """[len(texts), d] normalised float32 text embeddings. Ranks with fewer texts than the
    busiest one embed ``filler`` prompts (then dropped) so that all run the same forwards, and
    every forward is a full batch: a text's embedding then does not depend on how the texts were
    split over ranks (kernels may round differently for other batch shapes)."""
    most = max(gather_sizes(len(texts), device))
    padded = texts + [filler] * (-(-most // batch_size) * batch_size - len(texts))
    with eval_mode(model):
        chunks = [
            model.encode_text(tokenizer_fn(padded[i : i + batch_size], context_length).to(device), normalize=True).float()
            for i in range(0, len(padded), batch_size)
        ]
    embeddings = torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)
    return embeddings[: len(texts)]
