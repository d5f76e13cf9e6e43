"""Write image-caption pairs as WebDataset shards in img2dataset's layout.

Each sample is ``KEY.{jpg,png,webp}`` + ``KEY.txt`` (caption) + ``KEY.json`` (metadata), and
``KEY.cls`` (class index) for zero-shot eval shards. Beside the shards goes
``{prefix}-index.json`` with the sample count of every shard, which the training loader reads
instead of scanning the tars. The index is written last, so its presence marks a complete set.

    python -m clipdist.data.write_shards --images DIR --captions captions.csv --out DIR
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections import Counter
from typing import Iterable, Iterator, Optional

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from clipdist.data.shards import ShardInfo, index_path, shard_name, url_pattern, write_index

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def write_samples(samples: Iterable[dict], out_dir: str, prefix: str, shard_size: int) -> list[ShardInfo]:
    """Write WebDataset samples (dicts with ``__key__`` and one entry per file extension) into
    shards of ``shard_size`` samples, then the index. Returns the shards written."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    shards: list[ShardInfo] = []
    writer: Optional[wds.TarWriter] = None
    count = 0
    for sample in samples:
        if writer is None or count == shard_size:
            if writer is not None:
                writer.close()
                shards.append(ShardInfo(shard_name(prefix, len(shards)), count))
            # A fixed mtime makes the tars byte-reproducible. An int, not 0.0: a float mtime makes
            # tarfile add a PAX record to every member, doubling the header parsing on read.
            writer = wds.TarWriter(os.path.join(out_dir, shard_name(prefix, len(shards))), mtime=0)
            count = 0
        writer.write(sample)
        count += 1
    if writer is not None:
        writer.close()
        shards.append(ShardInfo(shard_name(prefix, len(shards)), count))
    write_index(out_dir, prefix, shards)
    return shards


def read_caption_table(path: str) -> list[dict[str, str]]:
    """Rows of a CSV (or .tsv) file with a header row holding ``filename`` and ``caption``."""
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = {"filename", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        return list(reader)


def folder_samples(images_dir: str, rows: list[dict[str, str]], skipped: Counter) -> Iterator[dict]:
    """One WebDataset sample per caption row whose image exists and is readable; the others
    are counted in ``skipped`` by reason and logged. Keys are the row numbers."""
    for row_index, row in enumerate(tqdm(rows, desc="writing shards", unit="img")):
        filename = row["filename"]
        path = os.path.join(images_dir, filename)
        extension = IMAGE_EXTENSIONS.get(os.path.splitext(filename)[1].lower())
        if extension is None:
            skipped["unsupported_extension"] += 1
            logger.warning("skipping %s: extension is not one of %s", filename, sorted(IMAGE_EXTENSIONS))
            continue
        if not os.path.isfile(path):
            skipped["missing_image"] += 1
            logger.warning("skipping %s: no such file", path)
            continue
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except (UnidentifiedImageError, OSError) as error:
            skipped["unreadable_image"] += 1
            logger.warning("skipping %s: %s", path, error)
            continue
        with open(path, "rb") as f:
            image_bytes = f.read()
        yield {
            "__key__": f"{row_index:09d}",  # the caption row, as img2dataset numbers its input
            extension: image_bytes,
            "txt": row["caption"],
            "json": {"caption": row["caption"], "filename": filename, "width": width, "height": height},
        }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder holding the image files")
    parser.add_argument("--captions", required=True, help="CSV or TSV with a header row: filename,caption")
    parser.add_argument("--out", required=True, help="output folder for the shards and the index")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="train", help="shard names are PREFIX-000000.tar ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    rows = read_caption_table(args.captions)
    skipped: Counter = Counter()
    shards = write_samples(folder_samples(args.images, rows, skipped), args.out, args.prefix, args.shard_size)
    total = sum(s.samples for s in shards)
    print(f"wrote {total} samples in {len(shards)} shard(s) to {args.out}; index {index_path(args.out, args.prefix)}")
    if skipped:
        print(f"skipped {sum(skipped.values())} of {len(rows)} rows: {dict(skipped)}")
    if shards:
        print(f"data.train_urls=\"'{url_pattern(args.out, args.prefix, len(shards))}'\"  (quoted for the shell and Hydra)")


if __name__ == "__main__":
    main()
