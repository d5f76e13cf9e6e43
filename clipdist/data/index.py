"""Write clipdist's shard index for shards that have none, so that no run counts them again.

    python -m clipdist.data.index '/data/laion/{00000..41407}.tar'
    python -m clipdist.data.index 'http://host/laion/{00000..41407}.tar' --out laion-index.json

Each shard is read once, ``--workers`` at a time. The index goes beside local shards as
``PREFIX-index.json`` (where the loader looks for it); for remote shards, ``--out`` names a local
file to upload beside them, or to give as ``data.train_index`` / ``data.sources[i].index``. An
interrupted run continues where it stopped: finished counts are kept in ``.NAME.partial`` beside
the index until it is written. Missing shards are left out of the index (a run then reports them);
truncated ones are listed with the samples they hold and ``"truncated": true``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Optional

from clipdist.config import expand_urls, is_local
from clipdist.data.counts import index_name
from clipdist.data.shards import write_index_file
from clipdist.data.sources import MISSING_SHARD, TRUNCATED_SHARD, count_by_reading
from clipdist.data.urls import file_name

logger = logging.getLogger(__name__)


def default_index_path(urls: list[str]) -> str:
    folders = {os.path.dirname(u) for u in urls}
    if not all(is_local(u) for u in urls) or len(folders) != 1:
        raise ValueError("--out is needed: the shards are not all local files in one folder")
    return os.path.join(folders.pop() or ".", index_name(file_name(urls[0])))


def partial_path(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")


def read_progress(path: str) -> dict[str, dict]:
    """Counts finished by an earlier, interrupted run (a cut last line is dropped)."""
    done: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    done[entry["url"]] = entry
                except (ValueError, KeyError):
                    break
    return done


def entry_name(url: str, out: str) -> str:
    return os.path.relpath(url, os.path.dirname(out) or ".") if is_local(url) else file_name(url)


def count_shards(urls: list[str], out: str, workers: int, retries: int) -> list[dict]:
    """One entry per shard in URL order: {"url", "samples", "problem"}."""
    progress_path = partial_path(out)
    done = read_progress(progress_path)
    if done:
        logger.info("continuing: %d of %d shards counted by an earlier run (%s)", len(done), len(urls), progress_path)
    todo = [u for u in urls if u not in done]
    with open(progress_path, "a") as progress, ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(count_by_reading, url, retries): url for url in todo}
        for future in as_completed(futures):
            samples, problem = future.result()
            entry = {"url": futures[future], "samples": samples, "problem": problem}
            done[entry["url"]] = entry
            progress.write(json.dumps(entry) + "\n")
            progress.flush()
    return [done[u] for u in urls]


def listed_entries(counted: list[dict], out: str) -> list[dict]:
    entries = []
    for entry in counted:
        if entry["problem"] == MISSING_SHARD:
            continue
        listed = {"url": entry_name(entry["url"], out), "samples": entry["samples"]}
        if entry["problem"] == TRUNCATED_SHARD:
            listed["truncated"] = True
        entries.append(listed)
    return entries


def write_shard_index(pattern: str, out: Optional[str] = None, workers: int = 16, retries: int = 3) -> dict:
    urls = expand_urls(pattern)
    out = out or default_index_path(urls)
    started = time.perf_counter()
    counted = count_shards(urls, out, workers, retries)
    entries = listed_entries(counted, out)
    write_index_file(out, entries)
    os.remove(partial_path(out))
    problems = {p: [e["url"] for e in counted if e["problem"] == p] for p in (MISSING_SHARD, TRUNCATED_SHARD)}
    return {"index": out, "shards": len(entries), "samples": sum(e["samples"] for e in entries), "problems": problems,
            "seconds": time.perf_counter() - started}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="brace pattern of the shards (several joined with '::'); quote it for the shell")
    parser.add_argument("--out", help="the index file to write (default: PREFIX-index.json beside local shards)")
    parser.add_argument("--workers", type=int, default=16, help="shards read at once (default 16)")
    parser.add_argument("--retries", type=int, default=3, help="attempts after a transient read failure (default 3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        result = write_shard_index(args.shards, args.out, args.workers, args.retries)
    except (ValueError, OSError) as error:
        sys.exit(f"clipdist.data.index: {error}")
    print(f"wrote {result['index']}: {result['shards']} shards, {result['samples']} samples, in {result['seconds']:.1f} s")
    for problem, urls in result["problems"].items():
        if urls:
            print(f"{problem}: {len(urls)} shard(s), first {urls[0]}" + (" (left out of the index)" if problem == MISSING_SHARD else ""))


if __name__ == "__main__":
    main()
