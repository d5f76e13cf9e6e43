"""clip_benchmark's local WebDataset layout of a zero-shot classification set, read and written,
so that one eval set on disk serves both clipdist and LAION's CLIP_benchmark:

    ROOT/test/nshards.txt                          the number of shards, N
    ROOT/test/0.tar .. ROOT/test/{N-1}.tar         KEY.png|jpg|webp + KEY.cls (class index)
    ROOT/classnames.txt                            one class name per line
    ROOT/zeroshot_classification_templates.txt     one prompt per line, '{c}' for the class name

clipdist reads it as ``eval.zero_shot=[{name: NAME, root: ROOT}]`` (clipdist/eval/sets.py),
clip_benchmark as ``clip_benchmark eval --dataset wds/NAME --dataset_root ROOT``. A configured zero-shot set
(shards, class names, templates) is written in it by

    python -m clipdist.data.wds_layout --out data/wds_digits +experiment=digits

(clip_benchmark 1.6.2, clip_benchmark/datasets/builder.py: build_wds_dataset).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import webdataset as wds

from clipdist.config import ConfigError, expand_urls, is_local, load_config
from clipdist.data.counts import shard_sample_counts
from clipdist.data.pipeline import ensure_data
from clipdist.data.sources import iter_shard
from clipdist.fileio import link_or_copy

SPLIT = "test"  # clip_benchmark's default --split
NSHARDS = "nshards.txt"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
CLIP_BENCHMARK_PLACEHOLDER = "{c}"  # clip_benchmark fills prompts with template.format(c=name)
# clip_benchmark's default --num_workers: webdataset gives each loader worker whole shards and
# stops with "No samples found" when one gets none, so a set of fewer shards is split this far.
MIN_SHARDS = 4


def layout_shards(root: str, key: str) -> str:
    """The shard pattern of ROOT's test split, ``ROOT/test/{0..N-1}.tar``, from its nshards.txt."""
    if not is_local(root):
        raise ConfigError(f"{key}: {root}: clip_benchmark's layout is read from a local folder")
    path = os.path.join(root, SPLIT, NSHARDS)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as error:
        raise ConfigError(f"{key}: no {path} ({error.strerror}); expected clip_benchmark's layout: {SPLIT}/{NSHARDS}, {SPLIT}/0.tar.., {CLASSNAMES}, {TEMPLATES}") from None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{key}: {path}: expected the number of shards, got {text[:40]!r}")
    return os.path.join(root, SPLIT, f"{{0..{int(text) - 1}}}.tar")


def write_layout(root: Path, shards: Sequence[str], classnames: Sequence[str], templates: Sequence[str]) -> None:
    """ROOT in clip_benchmark's layout: the local ``shards`` as test/0.tar.. (hard links, copies
    where links fail; fewer than MIN_SHARDS are rewritten as MIN_SHARDS), the class names, and
    the templates with '{}' written as '{c}'."""
    if not shards:
        raise ConfigError("no shards to write")
    remote = next((url for url in shards if not is_local(url)), None)
    if remote:
        raise ConfigError(f"{remote}: only local shards can be laid out; copy them first")
    split_dir = root / SPLIT
    if any(Path(url).resolve().parent == split_dir.resolve() for url in shards):
        raise ConfigError(f"{root}: holds the shards to lay out ({split_dir}); write to another folder")
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob("*.tar"):
        stale.unlink()
    if len(shards) >= MIN_SHARDS:
        for i, shard in enumerate(shards):
            link_or_copy(Path(shard), split_dir / f"{i}.tar")
        num_shards = len(shards)
    else:
        num_shards = resplit(shards, split_dir)
    (split_dir / NSHARDS).write_text(f"{num_shards}\n")
    (root / CLASSNAMES).write_text("".join(f"{name}\n" for name in classnames), encoding="utf-8")
    prompts = [template.replace("{}", CLIP_BENCHMARK_PLACEHOLDER) for template in templates]
    (root / TEMPLATES).write_text("".join(f"{prompt}\n" for prompt in prompts), encoding="utf-8")


def resplit(shards: Sequence[str], split_dir: Path) -> int:
    """The samples of ``shards``, in order, as MIN_SHARDS shards (fewer for fewer samples) of
    sizes that differ by at most one. Returns the number written."""
    total = sum(shard.samples for shard in shard_sample_counts(tuple(shards)))
    num_shards = min(MIN_SHARDS, total)
    samples = (sample for url in shards for sample in iter_shard(url))
    for i in range(num_shards):
        with open(split_dir / f"{i}.tar", "wb") as f:
            tar = wds.TarWriter(f, mtime=0)  # a fixed mtime: byte-reproducible tars
            for sample in itertools.islice(samples, total // num_shards + (i < total % num_shards)):
                tar.write({key: value for key, value in sample.items() if key != "__url__"})
            tar.close()
    return num_shards


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipdist.data.wds_layout",
        description="Write a configured zero-shot eval set in clip_benchmark's WebDataset layout (ROOT/test/N.tar, classnames.txt, zeroshot_classification_templates.txt).",
    )
    parser.add_argument("--out", type=Path, required=True, help="ROOT, the folder to write (clip_benchmark's --dataset_root)")
    parser.add_argument("--set", dest="name", help="which eval.zero_shot set (its name); default: the first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides naming the config, e.g. +experiment=digits")
    args = parser.parse_args(argv)
    try:
        name = write_configured_set(args.out, args.overrides, args.name)
    except ConfigError as error:
        print(f"clipdist.data.wds_layout: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: clip_benchmark eval --dataset wds/{name} --dataset_root {args.out} ...; clipdist: 'eval.zero_shot=[{{name: {name}, root: {args.out}}}]'")
    return 0


def write_configured_set(root: Path, overrides: Sequence[str], name: Optional[str]) -> str:
    """The zero-shot set ``name`` (default: the first) of the config that ``overrides`` compose,
    its digits shards written first where the config generates them. Returns the set's name."""
    from clipdist.eval.sets import resolve_zero_shot_set  # not at the top: eval.sets reads this module

    cfg, _ = load_config(list(overrides))
    sets = {eval_set.name: (i, eval_set) for i, eval_set in enumerate(cfg.eval.zero_shot)}
    if not sets or (name is not None and name not in sets):
        raise ConfigError(f"eval.zero_shot: no set {name!r} (sets: {sorted(sets)})" if sets else "eval.zero_shot: no zero-shot set configured")
    index, eval_set = sets[name] if name is not None else next(iter(sets.values()))
    ensure_data(cfg.data)
    resolved = resolve_zero_shot_set(eval_set, f"eval.zero_shot[{index}]")
    write_layout(root, expand_urls(resolved.urls), resolved.classnames, resolved.templates)
    return eval_set.name


if __name__ == "__main__":
    sys.exit(main())
