"""Zero-shot classification: class embeddings from prompt templates, then top-k accuracy.

The class names are split over the ranks: each embeds the prompts of its share of the classes
and an all-gather gives every rank the same classifier. The images are split over the ranks
by the loader and the counts all-reduced at the end, so no rank idles while another works.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipdist.distributed import all_reduce_sum, get_rank, get_world_size
from clipdist.eval.embed import Tokenizer, all_gather_rows, embed_texts, eval_mode, input_dtype
from clipdist.eval.templates import fill_template

# Label of padding rows, which pad a rank's last batch so that every rank sees the same
# number of batches.
PAD_LABEL = -1


def class_share(num_classes: int, rank: int, world_size: int) -> range:
    """The contiguous classes one rank embeds; the shares differ by at most one class."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@torch.no_grad()
def build_classifier(
    model: nn.Module,
    tokenizer_fn: Tokenizer,
    classnames: list[str],
    templates: list[str],
    device: torch.device | str,
    context_length: int = 77,
    batch_size: int = 256,
) -> torch.Tensor:
    """[d, C] on every rank: per class, the renormalised mean of its normalised template
    embeddings. Collective when a process group exists."""
    if not classnames or not templates:
        raise ValueError(f"zero-shot classifier needs class names and templates, got {len(classnames)} and {len(templates)}")
    share = class_share(len(classnames), get_rank(), get_world_size())
    prompts = [fill_template(template, classnames[c]) for c in share for template in templates]
    embeddings = embed_texts(
        model, tokenizer_fn, prompts, device, context_length, batch_size, filler=fill_template(templates[0], classnames[0])
    )
    per_class = F.normalize(embeddings.reshape(len(share), len(templates), embeddings.shape[-1]).mean(dim=1), dim=-1)
    classifier, _ = all_gather_rows(per_class)
    return classifier.T.contiguous()


@torch.no_grad()
def zero_shot_eval(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classifier: torch.Tensor,
    device: torch.device | str,
    topk: Sequence[int] = (1, 5),
) -> dict:
    """Top-k and per-class top-1 accuracy over all ranks' (images, labels) batches; rows
    labelled -1 are padding.

    The loader must yield the same number of batches on every rank: the counts are reduced with
    one all_reduce at the end. Returns {"top1": ..., "top5": ..., "count": ..., "per_class_top1":
    mean over the classes that have images, "per_class": [top-1 per class, None without images]}.
    """
    num_classes = classifier.shape[1]
    classifier = classifier.to(device=device, dtype=torch.float32)
    dtype = input_dtype(model)
    # [correct@k for each k..., count, labels outside the classes, correct@1 per class...,
    # images per class...], on the device so batches don't sync.
    head = len(topk) + 2
    totals = torch.zeros(head + 2 * num_classes, dtype=torch.long, device=device)
    class_correct, class_count = totals[head:].view(2, num_classes)
    with eval_mode(model):
        for images, labels in loader:
            labels = labels.to(device)
            features = model.encode_image(images.to(device=device, dtype=dtype), normalize=True)
            logits = features.float() @ classifier
            ranked = logits.topk(min(max(topk), num_classes), dim=1).indices
            known = (labels >= 0) & (labels < num_classes)
            totals[len(topk) + 1] += ((labels != PAD_LABEL) & ~known).sum()
            hits, labels = (ranked == labels[:, None])[known], labels[known]
            for i, k in enumerate(topk):
                totals[i] += hits[:, :k].any(dim=1).sum()
            totals[len(topk)] += hits.shape[0]
            class_correct.index_add_(0, labels, hits[:, 0].long())
            class_count.index_add_(0, labels, torch.ones_like(labels))
    counts = all_reduce_sum(totals).tolist()
    count, unknown = counts[len(topk)], counts[len(topk) + 1]
    if unknown:
        raise ValueError(f"{unknown} eval image(s) have a label outside 0..{num_classes - 1}, the {num_classes} class names")
    if count == 0:
        raise ValueError("zero-shot loader yielded no labelled rows on any rank")
    results: dict = {f"top{k}": correct / count for k, correct in zip(topk, counts)}
    results["count"] = count
    correct_per_class, images_per_class = counts[head : head + num_classes], counts[head + num_classes :]
    per_class = [c / n if n else None for c, n in zip(correct_per_class, images_per_class)]
    present = [acc for acc in per_class if acc is not None]
    results["per_class_top1"] = sum(present) / len(present)
    results["per_class"] = per_class
    return results
