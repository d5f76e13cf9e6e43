"""WebDataset loaders where every rank takes the same number of steps and sees each sample once.

Layout of one training epoch (seed s, epoch e, R ranks, local batch B, W loader workers):

1. Shards are put in an order drawn from (s, e) and their samples laid end to end.
2. ``steps_per_epoch = total // (B * R)``; rank r owns the contiguous positions
   ``[r * steps * B, (r + 1) * steps * B)``. The tail (less than one global batch) is dropped
   and logged; since the shard order changes every epoch, so do the dropped samples.
3. torch's DataLoader takes batch i of a rank from worker i mod W, so the rank's batches are
   dealt round-robin to W *streams*, and each stream owns one contiguous slice of the rank's
   positions. A stream therefore opens only the shards overlapping its slice and skips the
   samples in front of it without decoding them.
4. Shuffling: a stream reads its slice in windows of ``shuffle_buffer`` samples (rounded down
   to whole batches, at least one) and cuts each window into batches after a permutation
   drawn from (s, e, rank, stream, window). Batch contents are thus a pure function of
   (seed, epoch, world size, local batch, workers, shuffle buffer): ``start_step=k`` yields
   exactly batches k.. of an uninterrupted epoch, provided num_workers is unchanged.

A sample with an undecodable or missing image, or a missing or empty caption, is replaced by a
good sample of the same batch (a duplicate row), so batch shapes and step counts stay equal
across ranks. Borrowing from later batches instead would make batch contents depend on whether
earlier batches were decoded, which breaks resume; the number of duplicates is the same either
way. Replacements are counted per reason plus "padded" on ``Batch.skipped`` and summed on
``TrainLoader.skipped``.
"""

from __future__ import annotations

import functools
import glob
import io
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from clipdist.config import DataConfig, expand_urls, is_local, missing_local_shards
from clipdist.data.transforms import clip_preprocess
from clipdist.data.shards import load_index

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


@dataclass
class Batch:
    images: torch.Tensor  # float32 [b, 3, S, S], CLIP-normalised
    tokens: torch.Tensor  # int64 [b, context_length]
    keys: list[str]  # "URL#__key__" of each row; a padded row repeats its source's key
    skipped: dict[str, int]  # rows of this batch replaced, by reason, plus "padded"

    def pin_memory(self) -> "Batch":
        # DataLoader(pin_memory=True) calls this; the dataclass is opaque to its default.
        return replace(self, images=self.images.pin_memory(), tokens=self.tokens.pin_memory())


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Shards and their sample counts


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one shard in tar order, as dicts of raw bytes keyed by extension."""
    stream = gopen(url, "rb")
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def indexed_counts(urls: Sequence[str]) -> dict[str, int]:
    """Sample counts from the ``*-index.json`` files that the shard writer puts beside shards."""
    counts = {}
    for folder in sorted({os.path.dirname(u) for u in urls if is_local(u)}):
        for path in glob.glob(os.path.join(folder, "*-index.json")):
            for info in load_index(path):
                counts[os.path.normpath(os.path.join(folder, info.url))] = info.samples
    return counts


@functools.lru_cache(maxsize=8)
def shard_sample_counts(urls: tuple[str, ...]) -> tuple[Shard, ...]:
    """Every shard with its sample count: from an index file if there is one, else by reading
    the shard once. Deterministic, so every rank computes the same answer on its own."""
    indexed = indexed_counts(urls)
    shards = []
    for url in urls:
        count = indexed.get(os.path.normpath(url)) if is_local(url) else None
        if count is None:
            logger.info("counting the samples of %s (no index file beside it)", url)
            count = sum(1 for _ in iter_shard(url))
        shards.append(Shard(url, count))
    return tuple(shards)


def read_positions(shards: Sequence[Shard], start: int, stop: int) -> Iterator[dict]:
    """Raw samples at positions [start, stop) of the shards laid end to end; samples in front
    of ``start`` within a shard are read past, not decoded."""
    offset = 0
    for shard in shards:
        lo, hi = max(start - offset, 0), min(stop - offset, shard.samples)
        if lo < hi:
            samples = iter_shard(shard.url)
            found = 0
            for sample in itertools.islice(samples, lo, hi):
                found += 1
                yield sample
            samples.close()
            if found < hi - lo:
                raise ValueError(f"{shard.url}: has fewer than the {shard.samples} samples its index lists")
        offset += shard.samples
        if offset >= stop:
            return


# ---------------------------------------------------------------------------------------------
# How a rank's batches are dealt to loader workers


@dataclass(frozen=True)
class RankPlan:
    shards: tuple[Shard, ...]  # in this epoch's order
    first_position: int  # the rank's first position in the concatenated shards
    num_samples: int  # positions the rank owns; fewer than num_batches * batch_size pads (eval)
    num_batches: int
    batch_size: int
    start_batch: int  # batches before it are skipped (resume)
    num_streams: int  # = max(1, num_workers)
    window_batches: int  # shuffle window, in batches
    shuffle_seed: Optional[tuple[int, ...]]  # None: no shuffling (eval)

    def stream_batches(self, stream: int) -> range:
        return range(stream, self.num_batches, self.num_streams)

    def stream_of_worker(self, worker: int) -> int:
        # DataLoader hands out its n-th batch from worker n % W, and the n-th batch it hands out
        # is the rank's batch start_batch + n.
        return (worker + self.start_batch) % self.num_streams

    def stream_slice(self, stream: int) -> tuple[int, int]:
        """The rank positions [lo, hi) that ``stream`` turns into batches."""
        batches_before = sum(len(self.stream_batches(s)) for s in range(stream))
        lo = self.first_position + batches_before * self.batch_size
        end = self.first_position + self.num_samples
        return min(lo, end), min(lo + len(self.stream_batches(stream)) * self.batch_size, end)

    def raw_batches(self, stream: int) -> Iterator[list[dict]]:
        """The raw samples of each batch of ``stream`` from start_batch on, in order. Eval
        batches past the rank's samples come out short or empty."""
        lo, hi = self.stream_slice(stream)
        num_batches = len(self.stream_batches(stream))
        first = len(range(stream, self.start_batch, self.num_streams))  # batches to skip
        per_window = self.window_batches
        window_size = per_window * self.batch_size
        first_window = first // per_window
        samples = read_positions(self.shards, min(lo + first_window * window_size, hi), hi)
        for w in range(first_window, -(-num_batches // per_window)):
            window = list(itertools.islice(samples, window_size))
            if self.shuffle_seed is not None:
                order = np.random.default_rng([*self.shuffle_seed, stream, w]).permutation(len(window))
                window = [window[i] for i in order]
            for t in range(max(first, w * per_window), min((w + 1) * per_window, num_batches)):
                offset = (t - w * per_window) * self.batch_size
                yield window[offset : offset + self.batch_size]


def epoch_shard_order(shards: Sequence[Shard], seed: int, epoch: int) -> tuple[Shard, ...]:
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return tuple(shards[i] for i in order)


# ---------------------------------------------------------------------------------------------
# Decoding


def sample_key(sample: dict) -> str:
    return f"{sample['__url__']}#{sample['__key__']}"


def decode_image(sample: dict, image_size: int) -> torch.Tensor:
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise BadSample("no_image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return clip_preprocess(image, image_size)
    except DECODE_ERRORS as error:
        raise BadSample("bad_image") from error


def decode_caption(sample: dict) -> str:
    caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        raise BadSample("no_caption")
    return caption


def decode_label(sample: dict) -> int:
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (KeyError, ValueError) as error:
        raise ValueError(f"{sample_key(sample)}: eval sample has no integer .cls label") from error


def train_batch(raw: list[dict], image_size: int, context_length: int) -> Batch:
    from clipdist.models.tokenizer import tokenize

    good: list[tuple[str, torch.Tensor, str]] = []
    skipped: Counter = Counter()
    for sample in raw:
        try:
            caption = decode_caption(sample)
            good.append((sample_key(sample), decode_image(sample, image_size), caption))
        except BadSample as bad:
            skipped[bad.reason] += 1
            logger.warning("skipping sample %s: %s", sample_key(sample), bad.reason)
    if not good:
        raise ValueError(f"every sample of a batch failed to decode ({dict(skipped)}), first {sample_key(raw[0])}")
    skipped["padded"] = len(raw) - len(good)
    rows = list(itertools.islice(itertools.cycle(good), len(raw)))
    keys, images, captions = zip(*rows)
    return Batch(
        images=torch.stack(images),
        tokens=tokenize(list(captions), context_length=context_length),
        keys=list(keys),
        skipped={reason: n for reason, n in skipped.items() if n},
    )


def eval_batch(raw: list[dict], image_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """A full batch; rows past the samples, and samples whose image fails, get label -1."""
    images = torch.zeros(batch_size, 3, image_size, image_size)
    labels = torch.full((batch_size,), -1, dtype=torch.long)
    skipped: Counter = Counter()
    for row, sample in enumerate(raw):
        label = decode_label(sample)
        try:
            images[row] = decode_image(sample, image_size)
            labels[row] = label
        except BadSample as bad:
            skipped[bad.reason] += 1
            logger.warning("eval sample %s unusable: %s", sample_key(sample), bad.reason)
    return images, labels, dict(skipped)


# ---------------------------------------------------------------------------------------------
# Datasets (one per rank, iterated by each loader worker) and loaders


class TrainStream(IterableDataset):
    def __init__(self, plan: RankPlan, image_size: int, context_length: int):
        self.plan, self.image_size, self.context_length = plan, image_size, context_length

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        stream = self.plan.stream_of_worker(info.id if info else 0)
        for raw in self.plan.raw_batches(stream):
            yield train_batch(raw, self.image_size, self.context_length)


class EvalStream(IterableDataset):
    def __init__(self, plan: RankPlan, image_size: int):
        self.plan, self.image_size = plan, image_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, int]]]:
        info = get_worker_info()
        stream = self.plan.stream_of_worker(info.id if info else 0)
        for raw in self.plan.raw_batches(stream):
            yield eval_batch(raw, self.image_size, self.plan.batch_size)


def iterate(dataset: IterableDataset, num_workers: int) -> Iterator:
    if num_workers == 0:
        return iter(dataset)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


class TrainLoader:
    """One epoch of one rank. ``len()`` is steps_per_epoch; iteration yields the batches
    start_step .. steps_per_epoch - 1, i.e. ``len(loader) - start_step`` Batch objects."""

    def __init__(self, dataset: TrainStream, num_workers: int, steps_per_epoch: int, start_step: int, dropped: int):
        self.dataset, self.num_workers = dataset, num_workers
        self.steps_per_epoch, self.start_step, self.dropped = steps_per_epoch, start_step, dropped
        self._skipped: Counter = Counter()

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def skipped(self) -> dict[str, int]:
        """Rows replaced so far in this rank's batches, by reason, plus "padded"."""
        return dict(self._skipped)

    def __iter__(self) -> Iterator[Batch]:
        for batch in iterate(self.dataset, self.num_workers):
            self._skipped.update(batch.skipped)
            yield batch


class EvalLoader:
    """Zero-shot eval batches (images, labels) of one rank; every rank yields ``len()`` batches of
    exactly batch_size rows, and rows with label -1 are padding to be ignored."""

    def __init__(self, dataset: EvalStream, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self._skipped: Counter = Counter()

    def __len__(self) -> int:
        return self.dataset.plan.num_batches

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in iterate(self.dataset, self.num_workers):
            self._skipped.update(skipped)
            yield images, labels


def build_train_loader(
    cfg: DataConfig,
    *,
    image_size: int,
    context_length: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
) -> TrainLoader:
    shards = shard_sample_counts(tuple(expand_urls(cfg.train_urls)))
    total = sum(s.samples for s in shards)
    global_batch = cfg.local_batch * world_size
    steps = total // global_batch
    if steps == 0:
        raise ValueError(
            f"data.train_urls: {total} samples, fewer than one global batch "
            f"(data.local_batch {cfg.local_batch} × {world_size} ranks = {global_batch})"
        )
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside [0, {steps}] (steps per epoch)")
    dropped = total - steps * global_batch
    if dropped and rank == 0:
        # Same count every epoch (only which samples changes): say it where a run starts.
        logger.log(logging.INFO if epoch == 0 or start_step else logging.DEBUG,"epoch %d: %d of %d samples left out (less than one global batch of %d)", epoch, dropped, total, global_batch)
    plan = RankPlan(
        shards=epoch_shard_order(shards, seed, epoch),
        first_position=rank * steps * cfg.local_batch,
        num_samples=steps * cfg.local_batch,
        num_batches=steps,
        batch_size=cfg.local_batch,
        start_batch=start_step,
        num_streams=max(1, cfg.num_workers),
        window_batches=max(1, cfg.shuffle_buffer // cfg.local_batch),
        shuffle_seed=(seed, epoch, rank),
    )
    return TrainLoader(TrainStream(plan, image_size, context_length), cfg.num_workers, steps, start_step, dropped)


def build_eval_loader(
    urls: str, *, image_size: int, rank: int, world_size: int, batch_size: int, num_workers: int = 0
) -> EvalLoader:
    """Samples in URL order, split into contiguous per-rank parts that differ by at most one;
    every rank yields ceil(largest part / batch_size) batches (ZeRO-3 forwards are collectives)."""
    shards = shard_sample_counts(tuple(expand_urls(urls)))
    total = sum(s.samples for s in shards)
    base, extra = divmod(total, world_size)
    plan = RankPlan(
        shards=shards,
        first_position=rank * base + min(rank, extra),
        num_samples=base + (rank < extra),
        num_batches=-(-(base + (extra > 0)) // batch_size),
        batch_size=batch_size,
        start_batch=0,
        num_streams=max(1, num_workers),
        window_batches=1,
        shuffle_seed=None,
    )
    return EvalLoader(EvalStream(plan, image_size), num_workers)


def ensure_data(cfg: DataConfig) -> None:
    """Write the digits shards when ``cfg.generate_digits`` is set and the train shards are
    missing. Call it on one rank while the others wait."""
    if not cfg.generate_digits or not missing_local_shards(cfg.train_urls):
        return
    from clipdist.data.digits import ensure_digits_shards

    ensure_digits_shards(os.path.dirname(expand_urls(cfg.train_urls)[0]) or ".")
    missing = missing_local_shards(cfg.train_urls)
    if missing:
        raise ValueError(f"data.train_urls: the digits shards were written but {missing[0]} is not among them")
