"""Shards written by the tests: sample i has key f"{i:09d}", an image whose red channel is i and
caption i, so every row of a batch can be traced back to what was written."""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter

import torch
from PIL import Image

from clipdist.data.transforms import CLIP_MEAN, CLIP_STD
from clipdist.data.write_shards import write_samples


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def coded_image(index: int) -> Image.Image:
    """A solid 8×8 image whose red channel is the sample index, so rows can be traced."""
    return Image.new("RGB", (8, 8), (index, 255 - index, 40))


def decoded_index(image: torch.Tensor) -> int:
    red = image[0].mean() * CLIP_STD[0] + CLIP_MEAN[0]
    return int(round(red.item() * 255))


def caption_of(index: int) -> str:
    return f"sample number {index}"


def coded_sample(index: int, with_class: bool = False) -> dict:
    """Sample ``index``: key f"{index:09d}", coded image ``index``, caption ``index``."""
    sample = {"__key__": f"{index:09d}", "png": png_bytes(coded_image(index)), "txt": caption_of(index)}
    if with_class:
        sample["cls"] = index
    return sample


def write_shard_set(out_dir: str, prefix: str, num_shards: int, shard_size: int) -> str:
    """Coded samples 0.. in equal shards PREFIX-000000.tar ... with one PREFIX-index.json, as the
    shard writer lays them out; returns the shards' brace pattern."""
    write_samples((coded_sample(i) for i in range(num_shards * shard_size)), out_dir, prefix, shard_size=shard_size)
    return os.path.join(out_dir, f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


def write_indexed_shards(out_dir: str, prefix: str, sizes: list[int], with_class: bool = False, first: int = 0) -> str:
    """Shards of the given sizes where sample i (from ``first`` on) has key f"{i:09d}", coded
    image i and caption i; returns their brace pattern."""
    index = first
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append(coded_sample(index, with_class))
            index += 1
        # One call per shard so the sizes are exactly as asked; the index is rewritten each time.
        write_samples(samples, out_dir, f"{prefix}{shard}", shard_size=size)
    return os.path.join(out_dir, f"{prefix}{{0..{len(sizes) - 1}}}-000000.tar")


def key_index(key: str) -> int:
    return int(key.rsplit("#", 1)[1])


# Bad data


def corrupt(index: int, kind: str) -> dict:
    sample = coded_sample(index)
    if kind == "bad_image":
        sample["png"] = sample["png"][: len(sample["png"]) // 2]  # truncated PNG
    elif kind == "garbage_image":
        sample = {"__key__": sample["__key__"], "jpg": b"\xff\xd8\xff\xe0 not really a JPEG", "txt": sample["txt"]}
    elif kind == "no_image":
        del sample["png"]
    elif kind == "no_caption":
        sample["txt"] = "  "
    elif kind == "missing_caption":
        del sample["txt"]
    elif kind == "bad_caption":
        sample["txt"] = b"\xff\xfe caption in no known encoding \x80"
    return sample


EXPECTED_REASON = {"bad_image": "bad_image", "garbage_image": "bad_image", "no_image": "no_image", "no_caption": "no_caption",
                   "missing_caption": "no_caption", "bad_caption": "bad_caption"}


def truncate_after(path: str, samples: int) -> None:
    """Cut a tar right after its first ``samples`` samples (at a member boundary)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = []
    for member in members:
        key = member.name.split(".")[0]
        if key not in keys:
            keys.append(key)
        if len(keys) > samples:
            cut = member.offset
            break
    with open(path, "r+b") as f:
        f.truncate(cut)


def write_faulty_shards(shard_dir: str) -> dict:
    """6 shards of 20 samples: every 10th sample bad (all kinds), shard 3 truncated after 12
    samples, shard 5 deleted after its index was written. Returns the injected counts."""
    kinds = list(EXPECTED_REASON)
    injected, good = Counter(), set()
    for shard in range(6):
        samples = []
        for i in range(shard * 20, shard * 20 + 20):
            kind = kinds[(i // 10) % len(kinds)] if i % 10 == 3 else None
            samples.append(corrupt(i, kind) if kind else corrupt(i, "good"))
            if shard == 5:
                continue
            if shard == 3 and i - shard * 20 >= 12:
                continue
            if kind:
                injected[EXPECTED_REASON[kind]] += 1
            else:
                good.add(i)
        write_samples(samples, shard_dir, f"f{shard}", shard_size=20)
    truncate_after(os.path.join(shard_dir, "f3-000000.tar"), 12)
    os.remove(os.path.join(shard_dir, "f5-000000.tar"))
    injected["truncated_shard"], injected["missing_shard"] = 8, 20
    return {"injected": dict(injected), "good": sorted(good)}
