"""WebDataset loaders where every rank takes the same number of steps, and batch contents are a
pure function of (seed, epoch, world size, local batch, workers, shuffle buffer, shards).

One epoch of one rank (seed s, epoch e, R ranks, local batch B, W loader workers):

1. exact mode: the shards of all sources are put in an order drawn from (s, e) and their samples
   laid end to end (positions, see sources.py). ``batches = total // (B·R·accum) · accum``; rank r
   owns the contiguous positions ``[r·batches·B, (r+1)·batches·B)``. The tail (less than one global
   batch) is dropped and logged; the shard order changes every epoch, and so do the dropped samples.
   resampled mode: ``samples_per_epoch`` sets the batches; each stream (below) reads its own
   endless sequence of shards drawn with replacement from (s, e, r, stream) by source weight.
2. torch's DataLoader takes batch i of a rank from worker i mod W, so the rank's batches are
   dealt round-robin to W *streams*, and each stream reads one contiguous slice of positions.
   A stream therefore opens only the shards overlapping its slice and skips the samples in
   front of it without decoding them.
3. Shuffling: a stream reads its slice in windows of ``shuffle_buffer`` samples (rounded down
   to whole batches, at least one) and cuts each window into batches after a permutation
   drawn from (s, e, r, stream, window). ``start_step=k`` therefore yields exactly batches k..
   of an uninterrupted epoch, provided num_workers is unchanged: resume needs no saved RNG.

Bad data never stops training and is never dropped silently. A sample with an undecodable or
missing image, or a missing, empty or non-UTF-8 caption, and the positions of a missing or
truncated shard, are replaced by good samples of the same batch (duplicate rows), so batch
shapes and step counts stay equal across ranks; a batch with no good sample at all borrows the
first good samples of its stream. Borrowing from the next batch instead would make contents
depend on whether earlier batches decoded, which breaks resume; the count of duplicates is the
same either way. Replacements are counted per reason (SKIP_REASONS) plus "padded".
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipdist.config import DataConfig, expand_urls, source_key, train_sources
from clipdist.data.counts import DataError, SourceCounts, count_all, shard_sample_counts
from clipdist.data.sources import UNINDEXED, Shard, ShardDraws, epoch_shard_order, first_readable_samples, iter_shard, locate, read_positions
from clipdist.data.transforms import load_image
from clipdist.faults import STOP_SIGNALS

__all__ = ["Batch", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader", "ensure_data", "iter_shard",
           "shard_sample_counts"]  # the last two for shard readers

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Why a row was replaced, in the order logs and checkpoints list them. "padded" counts the
# duplicate rows that took the place of bad ones.
SKIP_REASONS = ("bad_image", "no_image", "no_caption", "bad_caption", "missing_shard", "truncated_shard", UNINDEXED, "padded")
DRAW_TAG = 1 << 30  # keeps the draw seeds apart from the shuffle seeds (window indices stay below it)
LOGGED_BAD_SAMPLES = 20  # per process; the rest are counted, not logged


@dataclass
class Batch:
    images: torch.Tensor  # float32 [b, 3, S, S], CLIP-normalised
    tokens: torch.Tensor  # int64 [b, context_length]
    keys: list[str]  # "URL#__key__" of each row; a padded row repeats its source's key
    skipped: dict[str, int]  # rows of this batch replaced, by reason, plus "padded"
    sources: dict[int, int]  # rows per source index

    def pin_memory(self) -> "Batch":
        # DataLoader(pin_memory=True) calls this; the dataclass is opaque to its default.
        return replace(self, images=self.images.pin_memory(), tokens=self.tokens.pin_memory())


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# How a rank's batches are dealt to loader workers


@dataclass(frozen=True)
class RankPlan:
    shards: tuple[Shard, ...]  # exact and eval: this epoch's order, shared by every stream
    draws: Optional[ShardDraws]  # resampled: each stream reads its own endless draw instead
    first_position: int  # the rank's first position in the concatenated shards (exact, eval)
    num_samples: int  # positions the rank owns; fewer than num_batches * batch_size pads (eval)
    num_batches: int
    batch_size: int
    start_batch: int  # batches before it are skipped (resume)
    num_streams: int  # = max(1, num_workers)
    window_batches: int  # shuffle window, in batches
    seed: Optional[tuple[int, ...]]  # (seed, epoch, rank); None: read in order (eval)
    retries: int = 0  # per shard read, after transient failures (data.retries)

    def stream_batches(self, stream: int) -> range:
        return range(stream, self.num_batches, self.num_streams)

    def stream_of_worker(self, worker: int) -> int:
        # DataLoader hands out its n-th batch from worker n % W, and the n-th batch it hands out
        # is the rank's batch start_batch + n.
        return (worker + self.start_batch) % self.num_streams

    def batches_skipped(self, stream: int) -> int:
        """How many of ``stream``'s batches lie before start_batch (resume)."""
        return len(range(stream, self.start_batch, self.num_streams))

    def stream_shards(self, stream: int) -> Iterable[Shard]:
        if self.draws is None:
            return self.shards
        return self.draws.sequence((*self.seed, stream, DRAW_TAG))

    def stream_slice(self, stream: int) -> tuple[int, int]:
        """The positions [lo, hi) of stream_shards(stream) that ``stream`` turns into batches."""
        length = len(self.stream_batches(stream)) * self.batch_size
        if self.draws is not None:
            return 0, length
        batches_before = sum(len(self.stream_batches(s)) for s in range(stream))
        lo = self.first_position + batches_before * self.batch_size
        end = self.first_position + self.num_samples
        return min(lo, end), min(lo + length, end)

    def resume_position(self, stream: int) -> int:
        """Where ``stream`` starts reading: the first sample of the shuffle window holding its
        first batch from start_batch on."""
        lo, hi = self.stream_slice(stream)
        first = self.batches_skipped(stream)
        return min(lo + (first // self.window_batches) * self.window_batches * self.batch_size, hi)

    def raw_batches(self, stream: int) -> Iterator[list[dict]]:
        """The raw samples of each batch of ``stream`` from start_batch on, in order. Eval
        batches past the rank's samples come out short or empty."""
        hi = self.stream_slice(stream)[1]
        num_batches = len(self.stream_batches(stream))
        first = self.batches_skipped(stream)
        per_window = self.window_batches
        window_size = per_window * self.batch_size
        samples = read_positions(self.stream_shards(stream), self.resume_position(stream), hi, self.retries)
        for w in range(first // per_window, -(-num_batches // per_window)):
            window = list(itertools.islice(samples, window_size))
            if self.seed is not None:
                order = np.random.default_rng([*self.seed, stream, w]).permutation(len(window))
                window = [window[i] for i in order]
            for t in range(max(first, w * per_window), min((w + 1) * per_window, num_batches)):
                offset = (t - w * per_window) * self.batch_size
                yield window[offset : offset + self.batch_size]

    def describe_stream(self, stream: int) -> dict:
        """Where a stream resumes, in the terms of its shards (for the checkpoint and for people)."""
        index, shard, offset = locate(self.stream_shards(stream), self.resume_position(stream))
        batches, skipped = self.stream_batches(stream), self.batches_skipped(stream)
        return {
            "stream": stream,
            # None once the stream has dealt all its batches of the epoch (its last one may come
            # up to num_streams - 1 batches before the epoch's end).
            "next_batch": batches[skipped] if skipped < len(batches) else None,
            "shard_index": index,
            "shard": shard.url if shard else None,
            "sample_offset": offset,
            "rng": [*self.seed, stream] if self.seed else None,
        }


# ---------------------------------------------------------------------------------------------
# Decoding

_bad_samples_logged = 0


def sample_key(sample: dict) -> str:
    return f"{sample['__url__']}#{sample['__key__']}"


def metadata(sample: dict) -> dict:
    """The sample's ``.json`` (img2dataset: caption, url, key ...), or {} when absent or unreadable."""
    try:
        value = json.loads(sample["json"])
    except (KeyError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def log_bad_sample(sample: dict, reason: str) -> None:
    global _bad_samples_logged
    _bad_samples_logged += 1
    if _bad_samples_logged <= LOGGED_BAD_SAMPLES:
        origin = metadata(sample).get("url")
        logger.warning("skipping sample %s%s: %s", sample_key(sample), f" (from {origin})" if origin else "", reason)
        if _bad_samples_logged == LOGGED_BAD_SAMPLES:
            logger.warning("further bad samples are counted (data/skipped/* in the metrics) but not logged one by one")


def check_readable(sample: dict) -> None:
    if "__bad__" in sample:  # a position its shard could not deliver; the shard was logged
        raise BadSample(sample["__bad__"])


def decode_image(sample: dict, image_size: int) -> torch.Tensor:
    check_readable(sample)
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise BadSample("no_image")
    try:
        return load_image(data, image_size)
    except DECODE_ERRORS as error:
        raise BadSample("bad_image") from error


def caption_bytes(sample: dict) -> bytes:
    """``KEY.txt``, else the ``caption`` field of ``KEY.json`` (img2dataset writes both)."""
    if "txt" in sample:
        return sample["txt"]
    caption = metadata(sample).get("caption")
    return caption.encode("utf-8") if isinstance(caption, str) else b""


def decode_caption(sample: dict) -> str:
    check_readable(sample)
    try:
        caption = caption_bytes(sample).decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSample("bad_caption") from error
    if not caption:
        raise BadSample("no_caption")
    return caption


def decode_label(sample: dict) -> int:
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (KeyError, ValueError) as error:
        raise ValueError(f"{sample_key(sample)}: eval sample has no integer .cls label") from error


Row = tuple[str, torch.Tensor, str, int]  # key, image, caption, source


def decode_rows(raw: Iterable[dict], image_size: int, skipped: Counter) -> Iterator[Row]:
    """The usable samples of ``raw``, decoded; the others are counted in ``skipped``."""
    for sample in raw:
        if "__unindexed__" in sample:  # samples past the shard's count (sources.note_unindexed)
            skipped[UNINDEXED] += sample["__unindexed__"]
        try:
            caption = decode_caption(sample)
            yield sample_key(sample), decode_image(sample, image_size), caption, sample.get("__source__", 0)
        except BadSample as bad:
            skipped[bad.reason] += 1
            if "__bad__" not in sample:
                log_bad_sample(sample, bad.reason)


def train_batch(raw: list[dict], image_size: int, context_length: int, fallback: Callable[[], list[Row]]) -> Batch:
    """Bad samples are replaced by duplicates of the batch's good rows, or, when none is good,
    of ``fallback()`` rows, so every rank keeps the same batch size and number of steps."""
    from clipdist.models.tokenizer import tokenize

    skipped: Counter = Counter()
    own = list(decode_rows(raw, image_size, skipped))
    skipped["padded"] = len(raw) - len(own)
    good = own or fallback()
    rows = list(itertools.islice(itertools.cycle(good), len(raw)))
    keys, images, captions, sources = zip(*rows)
    return Batch(
        images=torch.stack(images),
        tokens=tokenize(list(captions), context_length=context_length),
        keys=list(keys),
        skipped={reason: n for reason, n in skipped.items() if n},
        sources=dict(Counter(sources)),
    )


def eval_batch(raw: list[dict], image_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """A full batch; rows past the samples, and samples whose image fails, get label -1."""
    images = torch.zeros(batch_size, 3, image_size, image_size)
    labels = torch.full((batch_size,), -1, dtype=torch.long)
    skipped: Counter = Counter()
    for row, sample in enumerate(raw):
        try:
            check_readable(sample)
            label = decode_label(sample)
            images[row] = decode_image(sample, image_size)
            labels[row] = label
        except BadSample as bad:
            skipped[bad.reason] += 1
            if "__bad__" not in sample:
                log_bad_sample(sample, bad.reason)
    return images, labels, dict(skipped)


# ---------------------------------------------------------------------------------------------
# Datasets (one per rank, iterated by each loader worker) and loaders


class TrainStream(IterableDataset):
    def __init__(self, plan: RankPlan, image_size: int, context_length: int):
        self.plan, self.image_size, self.context_length = plan, image_size, context_length

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        stream = self.plan.stream_of_worker(info.id if info else 0)
        fallback = functools.cache(lambda: self.fallback_rows(stream))
        for raw in self.plan.raw_batches(stream):
            yield train_batch(raw, self.image_size, self.context_length, fallback)

    def fallback_rows(self, stream: int) -> list[Row]:
        """Stand-ins for a batch with no usable sample (e.g. inside a missing shard): the first
        usable samples of the stream's part of the epoch. A pure function of the data, unlike
        "the last good batch", so a resumed run pads exactly like the uninterrupted one."""
        lo, hi = self.plan.stream_slice(stream)
        skipped: Counter = Counter()
        raw = read_positions(self.plan.stream_shards(stream), lo, hi, self.plan.retries)
        rows = list(itertools.islice(decode_rows(raw, self.image_size, skipped), self.plan.batch_size))
        if not rows:
            raise ValueError(f"none of the {hi - lo} samples of loader stream {stream} is usable ({dict(skipped)})")
        return rows


class EvalStream(IterableDataset):
    def __init__(self, plan: RankPlan, image_size: int):
        self.plan, self.image_size = plan, image_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, int]]]:
        info = get_worker_info()
        stream = self.plan.stream_of_worker(info.id if info else 0)
        for raw in self.plan.raw_batches(stream):
            yield eval_batch(raw, self.image_size, self.plan.batch_size)


def start_loader_worker(worker_id: int) -> None:
    """DataLoader's worker_init_fn."""
    ignore_stop_signals()
    exit_with_rank()


def ignore_stop_signals() -> None:
    """Slurm signals every process of a job step and torchrun its ranks' process groups, so a stop
    signal reaches the loader workers too. The rank itself stops after the step
    (faults.StopSignals) and shuts its workers down; a worker killed first would break the batch
    in flight and the checkpoint with it."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def exit_with_rank() -> None:
    """A worker is the forkserver's child, not its rank's, so torch's own check (has the parent
    changed?) never sees a SIGKILLed rank go, and the worker would live on. Watch the rank itself."""
    rank = multiprocessing.parent_process()
    if rank is None:  # num_workers=0: this is the rank
        return
    try:
        handle = os.pidfd_open(rank.pid)
    except ProcessLookupError:
        os._exit(1)
    threading.Thread(target=exit_when_readable, args=(handle,), name="clipdist-rank-watch", daemon=True).start()


def exit_when_readable(pidfd: int) -> None:
    select.select([pidfd], [], [])  # a process's pidfd becomes readable when it exits
    os._exit(1)


def loader_context() -> multiprocessing.context.BaseContext:
    """Loader workers are forked from a forkserver, never from the rank. A rank has threads (gloo,
    the heartbeat watchdog, the queue feeders of earlier loaders), and a child forked while one of
    them holds a lock can hang inside fork() before running any code: a first batch that never
    comes (seen about once in 50 two-worker epochs here). The forkserver is one single-threaded
    process per rank, started once with the loader code imported, so each worker forks cleanly
    and fast. Python 3.14 makes it the default on Linux for the same reason."""
    start_loader_forkserver()
    return multiprocessing.get_context("forkserver")


@functools.cache
def start_loader_forkserver() -> None:
    """Start the forkserver now (call early, to overlap its imports with model set-up). Stop
    signals are blocked while it starts, so it inherits them blocked: it lives as long as its
    rank's workers, and a stop signal killing it would take the workers of the batch in flight
    with it. Blocking, not ignoring, keeps a signal that arrives meanwhile pending for the rank."""
    multiprocessing.set_forkserver_preload(forkserver_preload())
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if on_main_thread else None
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def forkserver_preload() -> list[str]:
    """This module, and the rank's main module (``python -m clipdist.train``): multiprocessing
    runs the main module again in every worker, which costs nothing once the forkserver has
    imported what it imports."""
    main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    return [__name__] + ([main] if main and not main.endswith("__main__") else [])


def iterate(dataset: IterableDataset, num_workers: int) -> Iterator:
    if num_workers == 0:
        return iter(dataset)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=start_loader_worker,
        multiprocessing_context=loader_context(),
    )
    return iter(loader)


class TrainLoader:
    """One epoch of one rank. ``len()`` is steps_per_epoch; iteration yields the batches
    start_step .. steps_per_epoch - 1, i.e. ``len(loader) - start_step`` Batch objects."""

    def __init__(self, dataset: TrainStream, num_workers: int, dropped: int):
        self.dataset, self.num_workers, self.dropped = dataset, num_workers, dropped
        self.plan = dataset.plan
        self._skipped: Counter = Counter()

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def start_step(self) -> int:
        return self.plan.start_batch

    @property
    def skipped(self) -> dict[str, int]:
        """Rows replaced so far in this rank's batches, by reason, plus "padded"."""
        return dict(self._skipped)

    def __iter__(self) -> Iterator[Batch]:
        if self.start_step >= len(self):
            return
        for batch in iterate(self.dataset, self.num_workers):
            self._skipped.update(batch.skipped)
            yield batch


class EvalLoader:
    """Eval batches of one rank; every rank yields ``len()`` of them, of exactly batch_size rows.

    ``unpack(item) -> (batch, skipped counts)``; by default the zero-shot stream's
    (images, labels, skipped) items become (images, labels), where label -1 marks padding."""

    def __init__(self, dataset: IterableDataset, num_workers: int, unpack: Callable = lambda item: ((item[0], item[1]), item[2])):
        self.dataset, self.num_workers, self.unpack = dataset, num_workers, unpack
        self._skipped: Counter = Counter()

    def __len__(self) -> int:
        return self.dataset.plan.num_batches

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def __iter__(self) -> Iterator:
        for item in iterate(self.dataset, self.num_workers):
            batch, skipped = self.unpack(item)
            self._skipped.update(skipped)
            yield batch


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
    accum_steps: int = 1,
    shards: Optional[Sequence[Sequence[Shard]]] = None,
) -> TrainLoader:
    """One epoch of one rank's batches (of data.local_batch rows), from batch ``start_step`` on.
    Every rank gets the same number of batches, a multiple of ``accum_steps``. ``shards``: each
    source's shards with their counts (TrainData finds them once per run); default: found here."""
    sources = train_sources(cfg)
    shards = shards if shards is not None else [c.shards for c in count_sources(cfg)]
    total = sum(s.samples for group in shards for s in group)
    per_epoch = total if cfg.mode == "exact" else cfg.samples_per_epoch or total
    global_batch = cfg.local_batch * world_size * accum_steps
    steps = per_epoch // global_batch * accum_steps
    if steps == 0:
        raise ValueError(
            f"data: {per_epoch} samples per epoch, fewer than one global batch (data.local_batch "
            f"{cfg.local_batch} × {world_size} ranks × {accum_steps} accumulation = {global_batch})"
        )
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside [0, {steps}] (batches per epoch)")
    dropped = per_epoch - steps * cfg.local_batch * world_size if cfg.mode == "exact" else 0
    plan = RankPlan(
        shards=epoch_shard_order([s for group in shards for s in group], seed, epoch) if cfg.mode == "exact" else (),
        draws=ShardDraws(shards, tuple(s.weight for s in sources)) if cfg.mode == "resampled" else None,
        first_position=rank * steps * cfg.local_batch,
        num_samples=steps * cfg.local_batch,
        num_batches=steps,
        batch_size=cfg.local_batch,
        start_batch=start_step,
        num_streams=max(1, cfg.num_workers),
        window_batches=max(1, cfg.shuffle_buffer // cfg.local_batch),
        seed=(seed, epoch, rank),
        retries=cfg.retries,
    )
    return TrainLoader(TrainStream(plan, image_size, context_length), cfg.num_workers, dropped)


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
        draws=None,
        first_position=rank * base + min(rank, extra),
        num_samples=base + (rank < extra),
        num_batches=-(-(base + (extra > 0)) // batch_size),
        batch_size=batch_size,
        start_batch=0,
        num_streams=max(1, num_workers),
        window_batches=1,
        seed=None,
    )
    return EvalLoader(EvalStream(plan, image_size), num_workers)


def count_sources(cfg: DataConfig, cache: Optional[dict[str, int]] = None) -> list[SourceCounts]:
    """Each training source's shards with their sample counts (counts.py), logged per source."""
    sources = train_sources(cfg)
    keys = [source_key(cfg, i) for i in range(len(sources))]
    return count_all(sources, keys, assume_equal=cfg.mode == "resampled", cache={} if cache is None else cache, retries=cfg.retries)


def check_sources_readable(cfg: DataConfig, shards: Sequence[Sequence[Shard]], image_size: int, seed: int) -> None:
    """A source none of whose first shards yields a usable sample is a configuration mistake
    (wrong path, wrong format), not bad data to count: say so before training starts. The shards
    tried are the first of the source's first epoch, which training opens early anyway."""
    for i, (source, group) in enumerate(zip(train_sources(cfg), shards)):
        samples, why = first_readable_samples(epoch_shard_order(group, seed, 0))
        skipped: Counter = Counter()
        if samples and next(decode_rows(samples, image_size, skipped), None) is None:
            why = f"{sample_key(samples[0])}: none of its first {len(samples)} samples is usable ({dict(skipped)})"
            samples = []
        if not samples:
            raise DataError(f"{source_key(cfg, i)} ({source.urls}): unreadable: {why}")


def ensure_data(cfg: DataConfig) -> None:
    """With ``cfg.generate_digits``, write the digits shards into each folder where a training
    source (data.train_urls or any of data.sources) names them, unless they are there and current
    (ensure_digits_shards checks its version file). Any other source is the user's own data and is
    never written to. Call it on one rank while the others wait."""
    if not cfg.generate_digits:
        return
    from clipdist.data.digits import digits_folder, ensure_digits_shards

    for folder in sorted({digits_folder(source.urls) for source in train_sources(cfg)} - {None}):
        ensure_digits_shards(folder)
