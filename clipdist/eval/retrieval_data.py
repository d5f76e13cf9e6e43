"""Captioned eval batches for retrieval: images with all their captions, split over the ranks
exactly like the zero-shot loader (contiguous parts, the same number of batches everywhere).

A sample's ``KEY.txt`` holds its captions, one per line (CLIP_benchmark's layout for COCO and
Flickr30k shards); a single-caption img2dataset shard is the one-line case. A sample whose
image or captions are unusable is left out, with its captions, and counted by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipdist.data.pipeline import BadSample, EvalLoader, RankPlan, build_eval_loader, check_readable, decode_image, log_bad_sample


@dataclass
class CaptionedBatch:
    images: torch.Tensor  # float32 [batch_size, 3, S, S]; zeros where ``valid`` is False
    valid: torch.Tensor  # bool [batch_size]: False for padding rows and left-out samples
    captions: list[list[str]]  # per row; empty where ``valid`` is False
    skipped: dict[str, int]  # samples left out, by reason


def decode_captions(sample: dict) -> list[str]:
    check_readable(sample)
    try:
        text = sample.get("txt", b"").decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadSample("bad_caption") from error
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise BadSample("no_caption")
    return captions


def captioned_batch(raw: list[dict], image_size: int, batch_size: int) -> CaptionedBatch:
    images = torch.zeros(batch_size, 3, image_size, image_size)
    valid = torch.zeros(batch_size, dtype=torch.bool)
    captions: list[list[str]] = [[] for _ in range(batch_size)]
    skipped: Counter = Counter()
    for row, sample in enumerate(raw):
        try:
            row_captions = decode_captions(sample)
            images[row] = decode_image(sample, image_size)
        except BadSample as bad:
            skipped[bad.reason] += 1
            if "__bad__" not in sample:
                log_bad_sample(sample, bad.reason)
            continue
        valid[row], captions[row] = True, row_captions
    return CaptionedBatch(images, valid, captions, dict(skipped))


class CaptionedStream(IterableDataset):
    def __init__(self, plan: RankPlan, image_size: int):
        self.plan, self.image_size = plan, image_size

    def __iter__(self) -> Iterator[CaptionedBatch]:
        info = get_worker_info()
        stream = self.plan.stream_of_worker(info.id if info else 0)
        for raw in self.plan.raw_batches(stream):
            yield captioned_batch(raw, self.image_size, self.plan.batch_size)


def build_captioned_loader(
    urls: str, *, image_size: int, rank: int, world_size: int, batch_size: int, num_workers: int = 0
) -> EvalLoader:
    # The same per-rank split and batch count as the zero-shot loader: reuse its plan.
    zero_shot_loader = build_eval_loader(
        urls, image_size=image_size, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers
    )
    plan = zero_shot_loader.dataset.plan
    return EvalLoader(CaptionedStream(plan, image_size), num_workers, unpack=lambda batch: (batch, batch.skipped))
