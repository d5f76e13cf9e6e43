"""Shard file names and the two JSON files beside the shards.

``{prefix}-index.json`` lists every shard with its sample count, so loaders need not scan tars to
plan an epoch; it is written last, so its presence marks a complete set. ``{prefix}-stats.json``
is the shard writer's account (rows read, skips by reason, bytes) and its resume point."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

from clipdist.fileio import write_text_atomically


@dataclass(frozen=True)
class ShardInfo:
    url: str  # file name, relative to the index file's folder
    samples: int


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def partial_shard_path(out_dir: str, name: str) -> str:
    """Where a shard is written before it is complete: hidden, and not ``*.tar``, so neither a
    brace pattern nor a glob can pick up a half-written tar."""
    return os.path.join(out_dir, f".{name}.partial")


def index_path(out_dir: str, prefix: str) -> str:
    return os.path.join(out_dir, f"{prefix}-index.json")


def stats_path(out_dir: str, prefix: str) -> str:
    return os.path.join(out_dir, f"{prefix}-stats.json")


def url_pattern(out_dir: str, prefix: str, num_shards: int) -> str:
    """The brace pattern that expands to exactly the shards written."""
    if num_shards == 1:
        return os.path.join(out_dir, shard_name(prefix, 0))
    return os.path.join(out_dir, f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


def load_index(path: str) -> list[ShardInfo]:
    with open(path) as f:
        return [ShardInfo(s["url"], int(s["samples"])) for s in json.load(f)["shards"]]


def read_index(out_dir: str, prefix: str) -> Optional[list[ShardInfo]]:
    """The shards listed in ``{prefix}-index.json``, or None when there is no index."""
    path = index_path(out_dir, prefix)
    return load_index(path) if os.path.exists(path) else None


def write_index(out_dir: str, prefix: str, shards: list[ShardInfo]) -> None:
    write_index_file(index_path(out_dir, prefix), [asdict(s) for s in shards])


def write_index_file(path: str, entries: list[dict]) -> None:
    """``entries``: {"url": name relative to the index's folder, "samples": n, ...}."""
    index = {"shards": entries, "total": sum(e["samples"] for e in entries)}
    write_text_atomically(path, json.dumps(index, indent=1))


def remove_index(out_dir: str, prefix: str) -> None:
    """Withdraw the completeness mark before shards are rewritten."""
    try:
        os.remove(index_path(out_dir, prefix))
    except FileNotFoundError:
        pass
