"""How many samples each shard holds, found without reading the shards wherever possible.

Planning an epoch needs every shard's count (pipeline.py). Each shard takes it from the first of
these that has it, for local paths, ``http(s)://`` URLs and ``pipe:`` commands alike (a file
beside a shard is read through the shard's own opener, urls.py):

1. the source's ``index`` (``data.sources[i].index`` / ``data.train_index``): a clipdist index or
   an OpenCLIP ``sizes.json``, its names relative to its own folder;
2. clipdist's ``PREFIX-index.json`` beside the shards (the shard writer and
   ``python -m clipdist.data.index`` write it);
3. this run's ``shard_counts.json``: the counts that steps 4 and 8 found at an earlier launch;
4. img2dataset's ``NNNNN_stats.json`` beside each shard (``"successes"``);
5. OpenCLIP's ``sizes.json`` beside the shards (shard name -> count);
6. resampled mode only, shared equally over the shards: OpenCLIP's ``__len__`` (a folder's total);
7. resampled mode only, the same: the source's ``samples`` (OpenCLIP's --train-num-samples habit);
8. reading the shards, several at once, once per run (rank 0; see ``TrainData``).

Nothing here asks for a shard itself before step 8, and a folder costs at most four small
requests (index, first stats file, sizes.json, __len__) before its per-shard stats files.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from clipdist.config import SourceConfig, expand_urls, is_local
from clipdist.data.sources import Shard, count_by_reading, one_line
from clipdist.data.urls import file_name, folder_of, read_small_file, sibling, siblings, split_name
from clipdist.fileio import write_text_atomically

logger = logging.getLogger(__name__)

FETCH_THREADS = 16  # small files and shards read at once; network-bound, so threads suffice
COUNTED = "counted"


class DataError(ValueError):
    """The data cannot be used as configured; the message is one line naming the file or key."""


@dataclass
class SourceCounts:
    shards: tuple[Shard, ...]
    origins: dict[str, int] = field(default_factory=dict)  # where counts came from -> shards
    problems: dict[str, str] = field(default_factory=dict)  # url -> missing/truncated, found while counting
    newly_counted: dict[str, int] = field(default_factory=dict)  # per-shard counts worth caching (steps 4, 8)

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)


def normalised(url: str) -> str:
    return os.path.normpath(url) if is_local(url) else url


def index_name(shard: str) -> str:
    """``train-000123.tar`` -> ``train-index.json`` (the shard writer's naming)."""
    prefix = shard.split(".", 1)[0].rstrip("0123456789").rstrip("-_")
    return f"{prefix}-index.json" if prefix else "index.json"


def stats_name(shard: str) -> str:
    """``00042.tar`` -> ``00042_stats.json`` (img2dataset's naming)."""
    return f"{shard.split('.', 1)[0]}_stats.json"


def read_json(url: str, what: str) -> Optional[Any]:
    data = read_small_file(url)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{url}: {what} is not JSON ({one_line(error)})") from None


def index_entries(doc: Any, url: str) -> dict[str, int]:
    """name -> count from a clipdist index ({"shards": [{"url", "samples"}]}) or a sizes.json."""
    try:
        if isinstance(doc, dict) and isinstance(doc.get("shards"), list):
            return {str(s["url"]): int(s["samples"]) for s in doc["shards"]}
        if isinstance(doc, dict) and doc and all(isinstance(v, int) for v in doc.values()):
            return dict(doc)
    except (KeyError, TypeError, ValueError):
        pass
    raise DataError(f"{url}: not a shard index: expected clipdist's {{\"shards\": [{{\"url\", \"samples\"}}]}} or a sizes.json {{name: count}}")


def read_index(url: str) -> Optional[dict[str, int]]:
    """normalised shard URL -> count, from an index file (None if there is none)."""
    doc = read_json(url, "the index")
    if doc is None:
        return None
    beside = siblings(url)
    return {normalised(beside(name)): count for name, count in index_entries(doc, url).items()}


def equal_shares(total: int, urls: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(urls))
    return {url: base + (i < extra) for i, url in enumerate(urls)}


def fetch_all(fn: Callable[[str], Any], urls: Sequence[str]) -> list[Any]:
    if len(urls) <= 1:
        return [fn(u) for u in urls]
    with ThreadPoolExecutor(min(FETCH_THREADS, len(urls))) as pool:
        return list(pool.map(fn, urls))


class Lookup:
    """The counts of one source's shards, filled step by step; ``missing()`` is what is left."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.counts: dict[str, int] = {}
        self.origins: dict[str, int] = {}

    def missing(self) -> list[str]:
        return [u for u in self.urls if u not in self.counts]

    def take(self, found: dict[str, int], origin: str) -> None:
        taken = 0
        for url in self.missing():
            count = found.get(normalised(url))
            if count is not None:
                self.counts[url] = count
                taken += 1
        if taken:
            self.origins[origin] = self.origins.get(origin, 0) + taken

    def folders(self) -> dict[str, list[str]]:
        """The shards still without a count, by folder."""
        by_folder: dict[str, list[str]] = {}
        for url in self.missing():
            by_folder.setdefault(folder_of(url), []).append(url)
        return by_folder


def explicit_index(url: str, urls: Sequence[str], key: str) -> dict[str, int]:
    """Counts from an index named in the config. It may live anywhere, so its entries are matched
    to the pattern's shards by file name; one that matches none is an error."""
    doc = read_json(url, "the index")
    if doc is None:
        raise DataError(f"{key}: no index at {url}")
    entries = index_entries(doc, url)
    by_name: dict[str, list[str]] = {}
    for shard in urls:
        by_name.setdefault(file_name(shard), []).append(shard)
    stray = [name for name in entries if file_name(name) not in by_name]
    if stray:
        raise DataError(f"{url} (named by {key}): lists {len(stray)} shard(s) that the source's pattern does not, first: {stray[0]}")
    return {normalised(shard): n for name, n in entries.items() for shard in by_name[file_name(name)]}


def indexes_beside(urls: Sequence[str]) -> dict[str, int]:
    """Counts from the clipdist indexes in the folders of ``urls`` (all ``*-index.json`` of a local
    folder; the index named after the shards' prefix elsewhere)."""
    found: dict[str, int] = {}
    names = {(folder, index_name(name)) for folder, name in map(split_name, urls)}
    candidates = {sibling(folder, name) for folder, name in names}
    for folder in {folder for folder, _ in names if is_local(folder)}:
        candidates.update(glob.glob(sibling(folder, "*-index.json")))
    for url in sorted(candidates):
        found.update(read_index(url) or {})
    return found


def img2dataset_stats(urls: Sequence[str]) -> dict[str, int]:
    """Counts from img2dataset's per-shard stats files, when the folder's first shard has one."""
    first = successes(urls[0])
    if first is None:
        return {}
    return {normalised(u): n for u, n in zip(urls, [first, *fetch_all(successes, urls[1:])]) if n is not None}


def successes(url: str) -> Optional[int]:
    """A shard's sample count from img2dataset's stats file beside it, or None without one."""
    stats_url = sibling(url, stats_name(file_name(url)))
    doc = read_json(stats_url, "img2dataset's stats file")
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("successes"), int):
        raise DataError(f"{stats_url}: img2dataset's stats file has no integer \"successes\"")
    return doc["successes"]


def folder_total(urls: Sequence[str]) -> Optional[int]:
    """OpenCLIP's ``__len__`` beside the shards: the total of the folder."""
    len_url = sibling(urls[0], "__len__")
    data = read_small_file(len_url)
    if data is None:
        return None
    try:
        return int(data.decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{len_url}: expected a sample count (an integer)") from None


def count_source(
    source: SourceConfig,
    index: int,
    key: str,
    *,
    assume_equal: bool,
    cache: dict[str, int],
    retries: int = 0,
) -> SourceCounts:
    """Every shard of ``source`` with its sample count, looked up in the order of the module doc."""
    lookup = Lookup(expand_urls(source.urls))
    if source.index:
        index_key = "data.train_index" if key == "data.train_urls" else f"{key}.index"
        lookup.take(explicit_index(source.index, lookup.urls, index_key), "index")
    if lookup.missing():
        lookup.take(indexes_beside(lookup.missing()), "index")
    lookup.take(cache, "shard_counts.json")
    newly_counted: dict[str, int] = {}
    for urls in lookup.folders().values():
        stats = img2dataset_stats(urls)
        newly_counted.update(stats)
        lookup.take(stats, "img2dataset stats")
    for urls in lookup.folders().values():
        lookup.take(read_index(sibling(urls[0], "sizes.json")) or {}, "sizes.json")
    if assume_equal:
        for urls in lookup.folders().values():
            total = folder_total(urls)
            if total is not None:
                lookup.take(equal_shares(total, urls), "__len__ (equal shares)")
        if source.samples is not None and lookup.missing():
            lookup.take(equal_shares(source.samples, lookup.urls), f"{key}.samples (equal shares)")
    problems: dict[str, str] = {}
    if lookup.missing():
        counted, problems = count_by_reading_all(lookup.missing(), key, source.urls, retries)
        newly_counted.update(counted)
        lookup.take(counted, COUNTED)
    shards = tuple(Shard(url, lookup.counts[url], index) for url in lookup.urls)
    return SourceCounts(shards, lookup.origins, problems, newly_counted)


def count_by_reading_all(urls: Sequence[str], key: str, pattern: str, retries: int) -> tuple[dict[str, int], dict[str, str]]:
    logger.info("%s: counting the samples of %d shard(s) by reading them, %d at a time (no index, stats or sizes file "
                "beside them)", key, len(urls), min(FETCH_THREADS, len(urls)))
    started = time.perf_counter()
    results = fetch_all(lambda url: count_by_reading(url, retries), urls)
    counts = {normalised(u): n for u, (n, _) in zip(urls, results)}
    problems = {u: problem for u, (_, problem) in zip(urls, results) if problem}
    logger.info("%s: counted %d samples in %d shard(s) in %.1f s; this run keeps the counts (shard_counts.json). To skip "
                "counting in other runs, write an index once: python -m clipdist.data.index '%s'",
                key, sum(counts.values()), len(urls), time.perf_counter() - started, pattern)
    return counts, problems


def describe_origins(counts: SourceCounts) -> str:
    return ", ".join(f"{origin} {n}" for origin, n in counts.origins.items())


def count_all(sources: Iterable[SourceConfig], keys: Sequence[str], *, assume_equal: bool, cache: dict[str, int],
              retries: int = 0) -> list[SourceCounts]:
    results = []
    for i, (source, key) in enumerate(zip(sources, keys)):
        started = time.perf_counter()
        try:
            counts = count_source(source, i, key, assume_equal=assume_equal, cache=cache, retries=retries)
        except OSError as error:  # a count file that exists but cannot be fetched (read_small_file)
            raise DataError(f"{key}: {one_line(error)}") from None
        logger.info("%s: %d shards, %d samples; counts from %s (%.2f s)", key, len(counts.shards), counts.total,
                    describe_origins(counts), time.perf_counter() - started)
        results.append(counts)
    return results


@functools.lru_cache(maxsize=8)
def shard_sample_counts(urls: tuple[str, ...]) -> tuple[Shard, ...]:
    """The shards of ``urls`` with their counts, as each process finds them (eval sets, tools)."""
    source = SourceConfig(urls="::".join(urls))
    return count_source(source, 0, source.urls if len(urls) < 4 else f"{urls[0]} ...", assume_equal=False, cache={}).shards


# ---------------------------------------------------------------------------------------------
# The run's own record of counts found per shard (shard_counts.json)


def load_cached_counts(path: Optional[Path]) -> dict[str, int]:
    if path is None or not path.exists():
        return {}
    try:
        return {url: int(n) for url, n in json.loads(path.read_text())["shards"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("%s: unreadable (%s); counting anew", path, one_line(error))
        return {}


def save_cached_counts(path: Optional[Path], cache: dict[str, int]) -> None:
    if path is None or not cache:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"about": "sample counts per shard URL found by reading shards or img2dataset stats files; delete to count anew",
           "shards": dict(sorted(cache.items()))}
    write_text_atomically(path, json.dumps(doc, indent=1) + "\n")
