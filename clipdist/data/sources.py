"""Shards of the training sources: reading them, the order they are read in, and reads that
survive missing, truncated and interrupted shards. (Their sample counts: counts.py.)

Positions are the unit everything else is planned in: the shards of a sequence are laid end to
end and position p is the p-th sample of that concatenation. A shard that cannot deliver the
samples its count promises yields placeholders for the missing positions, so the positions of
every later sample, and therefore batch contents and resume points, stay where the plan put them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence

import numpy as np
from webdataset.tariterators import base_plus_ext

from clipdist.config import SourceConfig, is_local
from clipdist.data.urls import PERMANENT_ERRORS, TruncatedArchive, check_complete, open_stream, retry_delay

logger = logging.getLogger(__name__)

# What reading a shard raises when the file is absent, a pipe command fails or the tar is broken.
READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)

MISSING_SHARD = "missing_shard"
TRUNCATED_SHARD = "truncated_shard"
UNINDEXED = "unindexed"  # samples of a shard beyond the count its index gives (not trained)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    source: int = 0  # index into the run's sources


# ---------------------------------------------------------------------------------------------
# Reading one shard


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on its archive whether the iteration ended at the end-of-archive zero block. Python's
    tarfile ends quietly both there and where the file just stops, which would lose the samples of
    a tar cut at a member boundary without a word."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.end_marker_seen = True
            raise


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """WebDataset samples (files grouped by key) of a tar stream. A sample is handed on as soon as
    the next key's header is read, before that member's data, so a stream cut inside a member keeps
    every sample completed before it. Raises ConnectionCut (urls.py) when an HTTP transfer stopped
    early, and TruncatedArchive when the archive has no end marker."""
    archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)  # reads the first header
    current: Optional[dict] = None
    for member in archive:
        archive.members = []  # a streamed archive need not remember its members
        key, extension = base_plus_ext(member.name)  # WebDataset's own split: ("dir/key", "ext.ext2")
        if not member.isreg() or key is None or re.match(r"__[^/]*__($|/)", member.name):  # WebDataset's meta files
            continue
        extension = extension.lower()
        if current is not None and key != current["__key__"]:
            yield current
            current = None
        data = archive.extractfile(member).read()
        current = current or {"__key__": key, "__url__": url}
        if extension in current:
            raise ValueError(f"{member.name}: duplicate file name in tar file")
        current[extension] = data
    # A dropped connection may have cut the last sample short: withhold it for the retry to read
    # whole. A cut file has nothing more to give: the last sample goes on, checked when decoded.
    check_complete(stream)
    if current is not None:
        yield current
    if not getattr(archive, "end_marker_seen", False):  # an empty archive's marker is its first header
        raise TruncatedArchive(f"the archive ends at byte {archive.offset} without its end-of-archive blocks")


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one shard in tar order, as dicts of raw bytes keyed by extension."""
    stream = open_stream(url)
    try:
        yield from tar_samples(stream, url)
    finally:
        stream.close()


# A local file gives the same bytes when read again, so what is wrong with them (not a tar, a
# directory, a duplicate member, no permission) stays wrong; only the operating system's own I/O
# errors (a network file system's EIO or ESTALE) are worth a retry.
LOCAL_CONTENT_ERRORS = (tarfile.TarError, EOFError, ValueError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_permanent(error: BaseException, url: str) -> bool:
    return isinstance(error, PERMANENT_ERRORS) or (is_local(url) and isinstance(error, LOCAL_CONTENT_ERRORS))


def count_by_reading(url: str, retries: int = 0) -> tuple[int, Optional[str]]:
    """(samples, problem): problem is None, MISSING_SHARD or TRUNCATED_SHARD (then the samples are
    those that could be read; how many more the shard had is unknown)."""
    for attempt in range(retries + 1):
        count = 0
        try:
            for _ in iter_shard(url):
                count += 1
            return count, None
        except READ_ERRORS as error:
            if is_permanent(error, url) or attempt == retries:
                problem = MISSING_SHARD if count == 0 and not isinstance(error, TruncatedArchive) else TRUNCATED_SHARD
                logger.warning("%s: %s after %d samples (%s); counted as %d", url, problem, count, one_line(error), count)
                return count, problem
            time.sleep(retry_delay(attempt))
    raise AssertionError("unreachable")


def dataset_fingerprint(sources: Sequence[SourceConfig], shards: Sequence[Sequence[Shard]]) -> str:
    """Changes when any shard, count, weight or source changes: a saved position means nothing then."""
    described = [[s.name, s.weight, [(sh.url, sh.samples) for sh in group]] for s, group in zip(sources, shards)]
    return hashlib.sha1(json.dumps(described).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading positions


def placeholder(shard: Shard, index: int, reason: str) -> dict:
    return {"__url__": shard.url, "__key__": f"@{index}", "__bad__": reason, "__source__": shard.source}


def read_shard_range(shard: Shard, lo: int, hi: int, retries: int = 0) -> Iterator[dict]:
    """Samples [lo, hi) of a shard; those it cannot deliver come out as placeholders. A transient
    failure (a dropped connection, a failing pipe) reopens the shard up to ``retries`` times and
    reads on from where it broke. Samples beyond the shard's count are read past and counted."""
    done = 0  # samples of the shard passed so far, yielded or not
    failure: Optional[BaseException] = None
    for attempt in range(retries + 1):
        if failure is not None:
            logger.warning("%s: retrying (%d of %d) after %d samples: %s", shard.url, attempt, retries, done, one_line(failure))
            time.sleep(retry_delay(attempt - 1))
        try:
            samples = iter_shard(shard.url)
            try:
                for _ in range(done):  # what an earlier attempt delivered
                    next(samples)
                while done < hi:
                    sample = next(samples)
                    done += 1
                    if done > lo:
                        if done == shard.samples:
                            note_unindexed(sample, shard, samples)
                        sample["__source__"] = shard.source
                        yield sample
            finally:
                samples.close()
            failure = None
            break
        except StopIteration:
            failure = None
            break
        except READ_ERRORS as error:
            failure = error
            if is_permanent(error, shard.url):
                break
    if done < hi:
        # Nothing read because of an error (not found, refused, garbage): missing. Samples read,
        # or none from an archive that opened and ended early: truncated.
        opened = failure is None or isinstance(failure, TruncatedArchive)
        reason = MISSING_SHARD if done == 0 and not opened else TRUNCATED_SHARD
        why = one_line(failure) if failure else "the archive is complete"
        logger.warning("%s: %s: %d of the %d samples its count gives could be read (%s)", shard.url, reason, done, shard.samples, why)
        for index in range(max(done, lo), hi):
            yield placeholder(shard, index, reason)


def note_unindexed(last: dict, shard: Shard, rest: Iterator[dict]) -> None:
    """Read past the rest of a shard after its last counted sample: samples there mean the index
    that gave the count is stale. They are counted on ``last`` (not trained: the epoch's plan has
    no place for them), and the end of the archive is checked."""
    extra = 0
    try:
        for _ in rest:
            extra += 1
    except READ_ERRORS as error:
        logger.warning("%s: after its %d counted samples: %s", shard.url, shard.samples, one_line(error))
    if extra:
        last["__unindexed__"] = extra
        logger.warning(
            "%s: holds %d samples more than the %d its index gives; the index is stale (rewrite it: python -m "
            "clipdist.data.index); the extra samples are counted as data/skipped/%s, not trained",
            shard.url, extra, shard.samples, UNINDEXED,
        )


def read_positions(shards: Iterable[Shard], start: int, stop: int, retries: int = 0) -> Iterator[dict]:
    """Raw samples at positions [start, stop) of the shards laid end to end. Shards in front of
    ``start`` are not opened, and samples in front of it within a shard are read past, not decoded.
    ``shards`` may be endless (resampled mode)."""
    offset = 0
    for shard in shards:
        if offset >= stop:
            return
        lo, hi = max(start - offset, 0), min(stop - offset, shard.samples)
        if lo < hi:
            yield from read_shard_range(shard, lo, hi, retries)
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
