"""Shards of the training sources: their sample counts, the order they are read in, and reads
that survive missing and truncated shards.

Positions are the unit everything else is planned in: the shards of a sequence are laid end to
end and position p is the p-th sample of that concatenation. A shard that cannot deliver the
samples its count promises yields placeholders for the missing positions, so the positions of
every later sample, and therefore batch contents and resume points, stay where the plan put them.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from clipdist.config import SourceConfig, expand_urls, is_local
from clipdist.data.shards import load_index

logger = logging.getLogger(__name__)

# What reading a shard raises when the file is absent, a pipe command fails or the tar is broken.
READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)

MISSING_SHARD = "missing_shard"
TRUNCATED_SHARD = "truncated_shard"


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    source: int = 0  # index into the run's sources


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one shard in tar order, as dicts of raw bytes keyed by extension."""
    stream = gopen(url, "rb")
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# Sample counts


def indexed_counts(urls: Sequence[str]) -> dict[str, int]:
    """Sample counts from the ``*-index.json`` files that the shard writer puts beside shards."""
    counts = {}
    for folder in sorted({os.path.dirname(u) for u in urls if is_local(u)}):
        for path in glob.glob(os.path.join(folder, "*-index.json")):
            for info in load_index(path):
                counts[os.path.normpath(os.path.join(folder, info.url))] = info.samples
    return counts


def count_by_reading(url: str) -> int:
    count = 0
    try:
        for _ in iter_shard(url):
            count += 1
    except READ_ERRORS as error:
        # Without an index nobody knows what was lost; what is readable is all there is.
        logger.warning("%s: unreadable after %d samples (%s); using those %d", url, count, one_line(error), count)
    return count


@functools.lru_cache(maxsize=8)
def shard_sample_counts(urls: tuple[str, ...], source: int = 0) -> tuple[Shard, ...]:
    """Every shard with its sample count: from an index file if there is one, else by reading
    the shard once. Deterministic, so every rank computes the same answer on its own."""
    indexed = indexed_counts(urls)
    shards = []
    for url in urls:
        count = indexed.get(os.path.normpath(url)) if is_local(url) else None
        if count is None:
            logger.info("counting the samples of %s (no index file beside it)", url)
            count = count_by_reading(url)
        shards.append(Shard(url, count, source))
    return tuple(shards)


def source_shards(sources: Sequence[SourceConfig]) -> tuple[tuple[Shard, ...], ...]:
    return tuple(shard_sample_counts(tuple(expand_urls(s.urls)), i) for i, s in enumerate(sources))


def dataset_fingerprint(sources: Sequence[SourceConfig], shards: Sequence[Sequence[Shard]]) -> str:
    """Changes when any shard, count, weight or source changes: a saved position means nothing then."""
    described = [[s.name, s.weight, [(sh.url, sh.samples) for sh in group]] for s, group in zip(sources, shards)]
    return hashlib.sha1(json.dumps(described).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading positions


def placeholder(shard: Shard, index: int, reason: str) -> dict:
    return {"__url__": shard.url, "__key__": f"@{index}", "__bad__": reason, "__source__": shard.source}


def read_shard_range(shard: Shard, lo: int, hi: int) -> Iterator[dict]:
    """Samples [lo, hi) of a shard; those it cannot deliver come out as placeholders."""
    position, reason = 0, None
    try:
        samples = iter_shard(shard.url)
        try:
            for sample in samples:
                if position >= lo:
                    sample["__source__"] = shard.source
                    yield sample
                position += 1
                if position >= hi:
                    break
        finally:
            samples.close()
    except READ_ERRORS as error:
        reason = MISSING_SHARD if position == 0 else TRUNCATED_SHARD
        logger.warning("%s: %s after %d samples: %s", shard.url, reason, position, one_line(error))
    if position < hi:
        if reason is None:
            reason = TRUNCATED_SHARD
            logger.warning("%s: %s: ended after %d of the %d samples its index lists", shard.url, reason, position, shard.samples)
        for index in range(max(position, lo), hi):
            yield placeholder(shard, index, reason)


def read_positions(shards: Iterable[Shard], start: int, stop: int) -> Iterator[dict]:
    """Raw samples at positions [start, stop) of the shards laid end to end. Shards in front of
    ``start`` are not opened, and samples in front of it within a shard are read past, not decoded.
    ``shards`` may be endless (resampled mode)."""
    offset = 0
    for shard in shards:
        if offset >= stop:
            return
        lo, hi = max(start - offset, 0), min(stop - offset, shard.samples)
        if lo < hi:
            yield from read_shard_range(shard, lo, hi)
        offset += shard.samples


def locate(shards: Iterable[Shard], position: int) -> tuple[int, Optional[Shard], int]:
    """(index in the sequence, shard, sample offset in it) of a position; (n, None, 0) past the end."""
    offset, index = 0, 0
    for index, shard in enumerate(shards):
        if position < offset + shard.samples:
            return index, shard, position - offset
        offset += shard.samples
    return index + 1, None, 0


# ---------------------------------------------------------------------------------------------
# Orders: one permutation per epoch (exact), endless weighted draws (resampled)


def epoch_shard_order(shards: Sequence[Shard], seed: int, epoch: int) -> tuple[Shard, ...]:
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return tuple(shards[i] for i in order)


@dataclass(frozen=True)
class ShardDraws:
    """Shards drawn with replacement: a source by its weight, then one of its shards in
    proportion to its sample count, so the achieved mix of samples follows the weights."""

    shards: tuple[tuple[Shard, ...], ...]  # per source
    weights: tuple[float, ...]

    def sequence(self, seed: Sequence[int]) -> Iterator[Shard]:
        """The same endless sequence for the same seed (e.g. seed, epoch, rank, stream)."""
        rng = np.random.default_rng(list(seed))
        sizes = [np.array([s.samples for s in group], dtype=np.float64) for group in self.shards]
        usable = np.array([w if size.sum() > 0 else 0.0 for w, size in zip(self.weights, sizes)])
        source_p = usable / usable.sum()
        shard_p = [size / size.sum() if size.sum() > 0 else None for size in sizes]
        while True:
            source = rng.choice(len(self.shards), p=source_p)
            yield self.shards[source][rng.choice(len(self.shards[source]), p=shard_p[source])]


# ---------------------------------------------------------------------------------------------
# Sources that cannot be read at all


def first_readable_samples(shards: Sequence[Shard], attempts: int = 4, count: int = 16) -> tuple[list[dict], str]:
    """Up to ``count`` samples of the first shard that opens, trying up to ``attempts`` shards that
    claim samples; else ([], why the first of them failed)."""
    why = "no shards"
    # Shards counted as empty are tried too when nothing else is left: their error says why.
    for shard in ([s for s in shards if s.samples > 0] or list(shards))[:attempts]:
        samples: list[dict] = []
        try:
            for sample in iter_shard(shard.url):
                samples.append(sample)
                if len(samples) == count:
                    break
        except READ_ERRORS as error:
            failure = one_line(error)
        else:
            failure = "has no samples"
        if samples:
            return samples, ""
        if why == "no shards":
            why = f"{shard.url}: {failure}"
    return [], why


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
