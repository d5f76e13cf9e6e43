"""A real, tiny image-text dataset that needs no download: scikit-learn's handwritten digits.

The 1,797 8×8 greyscale digits become 32×32 RGB PNGs (dark ink on white). A stratified split
keeps 300 for evaluation; the rest get one caption each from TRAIN_TEMPLATES. The eval samples
carry their label (KEY.cls) for zero-shot classification and three captions (KEY.txt, one per
line, from EVAL_CAPTION_TEMPLATES) for retrieval. Neither the zero-shot prompts
(eval.zero_shot in conf/data/digits.yaml) nor the eval captions occur as training captions, so
evaluation measures transfer rather than recall of a seen string.

    python -m clipdist.data.digits --out data/digits
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from clipdist.config import expand_urls, is_local
from clipdist.data.shards import read_index, shard_name, url_pattern
from clipdist.data.write_shards import write_samples
from clipdist.fileio import write_text_atomically

DIGIT_CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {numeral} is "7", {word} is "seven".
TRAIN_TEMPLATES = [
    "a photo of the number {numeral}.",
    "a handwritten digit {word}.",
    "the digit {word}",
    "a picture of a {numeral}",
    "an 8x8 image of the number {word}",
    "a scanned {word}, written by hand.",
    "the numeral {numeral} in dark ink",
    "a low resolution picture of a {word}.",
]

# Every eval image gets all three, in this order.
EVAL_CAPTION_TEMPLATES = [
    "a black and white image of the handwritten number {word}.",
    "someone wrote the numeral {numeral} here.",
    "a tiny greyscale drawing showing {word}.",
]

EVAL_SIZE = 300
TRAIN_SHARDS = 4
EVAL_SHARDS = 2
IMAGE_SIZE = 32
SEED = 0
# Raised whenever the shards' contents change, so that older shards are rewritten. 2: eval
# samples hold EVAL_CAPTION_TEMPLATES captions instead of a training caption.
FORMAT_VERSION = 2


def train_caption(label: int, template_index: int) -> str:
    return TRAIN_TEMPLATES[template_index].format(numeral=label, word=DIGIT_CLASSNAMES[label])


def eval_captions(label: int) -> list[str]:
    return [template.format(numeral=label, word=DIGIT_CLASSNAMES[label]) for template in EVAL_CAPTION_TEMPLATES]


def digit_png(pixels: np.ndarray) -> bytes:
    """An 8×8 array of ink levels 0..16 as a 32×32 RGB PNG, dark ink on white."""
    grey = (255 - np.round(pixels * (255 / 16))).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digit_samples(images: np.ndarray, labels: np.ndarray, sources: np.ndarray, evaluation: bool) -> Iterator[dict]:
    template_rng = np.random.default_rng(SEED)
    for i, (pixels, label, source) in enumerate(zip(images, labels, sources)):
        label = int(label)
        origin = {"label": label, "source": "sklearn.datasets.load_digits", "source_index": int(source)}
        sample = {"__key__": f"{i:09d}", "png": digit_png(pixels)}
        if evaluation:
            captions = eval_captions(label)
            sample.update(txt="\n".join(captions), json={"captions": captions, **origin}, cls=label)
        else:
            caption = train_caption(label, int(template_rng.integers(len(TRAIN_TEMPLATES))))
            sample.update(txt=caption, json={"caption": caption, **origin})
        yield sample


def version_path(out_dir: str) -> str:
    return os.path.join(out_dir, "digits-version.json")


def is_current(out_dir: str) -> bool:
    try:
        with open(version_path(out_dir)) as f:
            return json.load(f).get("version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def digits_folder(urls: str) -> Optional[str]:
    """The folder where the brace pattern ``urls`` names digits train shards and nothing else, if
    the digits set may be written there: none of those shards exists yet, or the folder holds a
    digits set (its version file). None otherwise, for the shards are someone's own data."""
    paths = expand_urls(urls)
    folders = {os.path.dirname(path) or "." for path in paths}
    names = {os.path.basename(path) for path in paths}
    if len(folders) != 1 or not all(map(is_local, paths)) or not names <= {shard_name("train", i) for i in range(TRAIN_SHARDS)}:
        return None
    folder = folders.pop()
    ours = os.path.exists(version_path(folder)) or not any(map(os.path.exists, paths))
    return folder if ours else None


def is_complete(out_dir: str, prefix: str, num_shards: int, num_samples: int) -> bool:
    shards = read_index(out_dir, prefix)
    return (
        shards is not None
        and len(shards) == num_shards
        and sum(s.samples for s in shards) == num_samples
        and all(os.path.isfile(os.path.join(out_dir, s.url)) for s in shards)
    )


def ensure_digits_shards(out_dir: str = "data/digits") -> dict:
    """Write the digits train and eval shards unless a complete set of this FORMAT_VERSION is
    already there (the version file is written last).

    Returns {"train_urls", "eval_urls", "train_samples", "eval_samples"}.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    num_train = len(digits.target) - EVAL_SIZE
    splits = {"train": (TRAIN_SHARDS, num_train), "eval": (EVAL_SHARDS, EVAL_SIZE)}
    complete = all(is_complete(out_dir, prefix, shards, samples) for prefix, (shards, samples) in splits.items())
    if not (complete and is_current(out_dir)):
        indices = np.arange(len(digits.target))
        train_idx, eval_idx = train_test_split(indices, test_size=EVAL_SIZE, stratify=digits.target, random_state=SEED)
        for prefix, idx in (("train", train_idx), ("eval", eval_idx)):
            num_shards = splits[prefix][0]
            samples = digit_samples(digits.images[idx], digits.target[idx], idx, evaluation=prefix == "eval")
            write_samples(samples, out_dir, prefix, shard_size=math.ceil(len(idx) / num_shards))
        write_text_atomically(version_path(out_dir), json.dumps({"version": FORMAT_VERSION}) + "\n")
    return {
        "train_urls": url_pattern(out_dir, "train", TRAIN_SHARDS),
        "eval_urls": url_pattern(out_dir, "eval", EVAL_SHARDS),
        "train_samples": num_train,
        "eval_samples": EVAL_SIZE,
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write scikit-learn's digits as WebDataset shards.")
    parser.add_argument("--out", default="data/digits", help="output folder")
    args = parser.parse_args(argv)
    info = ensure_digits_shards(args.out)
    print(f"data.train_urls=\"'{info['train_urls']}'\"  ({info['train_samples']} samples)")
    print(f"eval.zero_shot.0.urls=\"'{info['eval_urls']}'\" eval.retrieval.0.urls=\"'{info['eval_urls']}'\"  ({info['eval_samples']} samples)")


if __name__ == "__main__":
    main()
