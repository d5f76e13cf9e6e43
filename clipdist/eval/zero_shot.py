"""Zero-shot classification: class embeddings from prompt templates, then top-k accuracy.

Every rank runs the same forwards (all class prompts, the same number of eval batches), which
ZeRO-3 needs because each forward gathers partitioned parameters collectively.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipdist.distributed import all_reduce_sum

# Label of padding rows, which pad a rank's last batch so that every rank sees the same
# number of batches.
PAD_LABEL = -1


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _input_dtype(model: nn.Module) -> torch.dtype:
    # DeepSpeed's bf16/fp16 engines hold the module in that dtype, so inputs must match.
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


@torch.no_grad()
def build_classifier(
    model: nn.Module,
    tokenizer_fn: Callable[[list[str], int], torch.Tensor],
    classnames: list[str],
    templates: list[str],
    device: torch.device | str,
    context_length: int = 77,
    batch_size: int = 256,
) -> torch.Tensor:
    """[d, C]: per class, the renormalised mean of its normalised template embeddings."""
    if not classnames or not templates:
        raise ValueError(f"zero-shot classifier needs class names and templates, got {len(classnames)} and {len(templates)}")
    prompts = [template.format(name) for name in classnames for template in templates]
    with _eval_mode(model):
        embeddings = torch.cat(
            [
                model.encode_text(tokenizer_fn(prompts[i : i + batch_size], context_length).to(device), normalize=True)
                for i in range(0, len(prompts), batch_size)
            ]
        )
    per_class = embeddings.float().reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T.contiguous()


@torch.no_grad()
def zero_shot_eval(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classifier: torch.Tensor,
    device: torch.device | str,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float | int]:
    """Top-k accuracy over all ranks' (images, labels) batches; rows labelled -1 are padding.

    The loader must yield the same number of batches on every rank: the result is reduced
    with one all_reduce at the end. Returns {"top1": ..., "top5": ..., "count": ...}.
    """
    num_classes = classifier.shape[1]
    classifier = classifier.to(device=device, dtype=torch.float32)
    dtype = _input_dtype(model)
    # [correct@k for each k..., count], accumulated on the device so batches don't sync.
    totals = torch.zeros(len(topk) + 1, dtype=torch.long, device=device)
    with _eval_mode(model):
        for images, labels in loader:
            labels = labels.to(device)
            features = model.encode_image(images.to(device=device, dtype=dtype), normalize=True)
            logits = features.float() @ classifier
            ranked = logits.topk(min(max(topk), num_classes), dim=1).indices
            hits = (ranked == labels[:, None])[labels != PAD_LABEL]
            for i, k in enumerate(topk):
                totals[i] += hits[:, :k].any(dim=1).sum()
            totals[-1] += hits.shape[0]
    counts = all_reduce_sum(totals).tolist()
    count = counts[-1]
    if count == 0:
        raise ValueError("zero-shot loader yielded no labelled rows on any rank")
    results: dict[str, float | int] = {f"top{k}": correct / count for k, correct in zip(topk, counts)}
    results["count"] = count
    return results
