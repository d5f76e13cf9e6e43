"""Image↔text retrieval recall@K over a captioned eval set, on all ranks, in bounded memory.

1. Each rank embeds its part of the images and their captions (the same number of forwards on
   every rank), then all-gathers both, so every rank holds all N image and M caption
   embeddings: (N + M) × d floats (100k images with 5 captions each at d = 512: 1.2 GB).
2. Each rank ranks only its own queries (its images against all captions, its captions
   against all images) in [chunk, chunk] similarity tiles, never the N × M matrix, and the
   hit counts are all-reduced.

A query's rank is the number of items that score more than TIE_TOLERANCE above its best
correct one: image→text counts a hit at K when any of the image's captions is among the top K,
text→image when the caption's own image is. Items that tie with the correct one (an identical
caption of another image, a duplicate image) do not push it down, and neither does float
rounding: the correct score is computed row by row, the tiles by matrix products, and the two
may differ in the last bits. The correct items themselves never count (none beats the best).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from clipdist.distributed import all_reduce_sum
from clipdist.eval.embed import Tokenizer, all_gather_rows, embed_texts, eval_mode, input_dtype
from clipdist.eval.retrieval_data import CaptionedBatch

RECALL_AT = (1, 5, 10)
# Cosine scores closer than this count as a tie, resolved in the query's favour: well above
# float32 rounding of a d ≤ 4096 dot product (~1e-6), well below the score gaps that rank items.
TIE_TOLERANCE = 1e-5


@dataclass
class LocalEmbeddings:
    """One rank's part of a captioned set: normalised float32 embeddings."""

    images: torch.Tensor  # [n, d]
    texts: torch.Tensor  # [m, d]
    text_image: torch.Tensor  # long [m]: the row in ``images`` of each caption's image


@torch.no_grad()
def embed_captioned(
    model: nn.Module,
    loader: Iterable[CaptionedBatch],
    tokenizer_fn: Tokenizer,
    device: torch.device | str,
    context_length: int,
    text_batch: int,
) -> LocalEmbeddings:
    dtype = input_dtype(model)
    images, captions, owners = [], [], []
    num_images = 0
    with eval_mode(model):
        for batch in loader:
            features = model.encode_image(batch.images.to(device=device, dtype=dtype), normalize=True).float()
            images.append(features[batch.valid.to(device)])
            for row in torch.nonzero(batch.valid).flatten().tolist():
                captions.extend(batch.captions[row])
                owners.extend([num_images] * len(batch.captions[row]))
                num_images += 1
    texts = embed_texts(model, tokenizer_fn, captions, device, context_length, text_batch)
    dim = images[0].shape[1] if images else texts.shape[1]
    return LocalEmbeddings(
        torch.cat(images) if images else torch.zeros(0, dim, device=device),
        texts if captions else torch.zeros(0, dim, device=device),
        torch.tensor(owners, dtype=torch.long, device=device),
    )


def count_ranks(queries: torch.Tensor, keys: torch.Tensor, best_correct: torch.Tensor, chunk: int) -> torch.Tensor:
    """long [q]: per query, the keys scoring more than TIE_TOLERANCE above ``best_correct``,
    counted in [chunk, chunk] tiles of ``queries @ keys.T``."""
    ranks = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for q0 in range(0, queries.shape[0], chunk):
        rows = slice(q0, q0 + chunk)
        threshold = best_correct[rows, None] + TIE_TOLERANCE
        for k0 in range(0, keys.shape[0], chunk):
            ranks[rows] += (queries[rows] @ keys[k0 : k0 + chunk].T > threshold).sum(dim=1)
    return ranks


def own_scores(local: LocalEmbeddings) -> torch.Tensor:
    """[m]: each local caption's score with its own image (which is local too)."""
    return (local.texts * local.images[local.text_image]).sum(dim=1)


def best_caption_scores(local: LocalEmbeddings, caption_scores: torch.Tensor) -> torch.Tensor:
    """[n]: each local image's score with its best caption."""
    best = torch.full((local.images.shape[0],), float("-inf"), device=caption_scores.device)
    return best.scatter_reduce(0, local.text_image, caption_scores, reduce="amax")


def recall_counts(local: LocalEmbeddings, ks: Sequence[int], chunk: int) -> torch.Tensor:
    """long [2 * len(ks) + 2], summed over ranks: image→text hits at each K, text→image hits at
    each K, images, captions. Collective."""
    all_images, _ = all_gather_rows(local.images)
    all_texts, _ = all_gather_rows(local.texts)
    caption_scores = own_scores(local)
    i2t = count_ranks(local.images, all_texts, best_caption_scores(local, caption_scores), chunk)
    t2i = count_ranks(local.texts, all_images, caption_scores, chunk)
    counts = [(i2t < k).sum() for k in ks] + [(t2i < k).sum() for k in ks]
    counts += [torch.tensor(i2t.numel(), device=i2t.device), torch.tensor(t2i.numel(), device=t2i.device)]
    return all_reduce_sum(torch.stack(counts).long())


@torch.no_grad()
def retrieval_eval(
    model: nn.Module,
    loader: Iterable[CaptionedBatch],
    tokenizer_fn: Tokenizer,
    device: torch.device | str,
    context_length: int = 77,
    ks: Sequence[int] = RECALL_AT,
    chunk: int = 4096,
    text_batch: int = 256,
) -> dict[str, float | int]:
    """{"image_to_text_R@K": ..., "text_to_image_R@K": ..., "images": N, "captions": M} over
    all ranks; the loader must yield the same number of batches on every rank."""
    local = embed_captioned(model, loader, tokenizer_fn, device, context_length, text_batch)
    if all_reduce_sum(torch.tensor([local.images.shape[0]], device=local.images.device)).item() == 0:
        raise ValueError("retrieval loader yielded no usable captioned image on any rank")
    counts = recall_counts(local, ks, chunk).tolist()
    num_images, num_texts = counts[-2], counts[-1]
    results: dict[str, float | int] = {}
    for i, k in enumerate(ks):
        results[f"image_to_text_R@{k}"] = counts[i] / num_images
    for i, k in enumerate(ks):
        results[f"text_to_image_R@{k}"] = counts[len(ks) + i] / num_texts
    results.update(images=num_images, captions=num_texts)
    return results
