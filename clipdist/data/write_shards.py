"""Write image-caption pairs as WebDataset shards in img2dataset's layout.

Each sample is ``KEY.{jpg,png,webp}`` + ``KEY.txt`` (caption) + ``KEY.json`` (metadata), and
``KEY.cls`` (class index) for zero-shot eval shards. KEY is the row's position over all input
tables, 9 digits, as img2dataset numbers its input. Beside the shards go
``{prefix}-index.json`` (the sample count of every shard, which the training loader reads
instead of scanning the tars; written last, so its presence marks a complete set) and
``{prefix}-stats.json`` (rows read, samples written, rows skipped by reason, bytes).

Input: CSV, TSV or parquet tables with an image column (a path, relative ones resolved against
the table's folder or --images; or, in parquet, the image bytes) and a caption column.

    python -m clipdist.data.write_shards --input captions.csv --out shards/
    python -m clipdist.data.write_shards --input parts/ --out shards/ --resize 256 --workers 8

A run that was interrupted continues where it stopped when started again with the same
arguments: shards already complete are kept, the one cut off is rewritten, and the result is the
same, byte for byte, as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import sys
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from clipdist.config import is_local
from clipdist.data.shards import (
    ShardInfo,
    index_path,
    partial_shard_path,
    read_index,
    remove_index,
    shard_name,
    stats_path,
    url_pattern,
    write_index,
)
from clipdist.data.transforms import center_crop_box, resized_size
from clipdist.fileio import write_text_atomically

logger = logging.getLogger(__name__)

# Tried in this order when --image-col / --caption-col is not given: img2dataset's parquet output
# ("jpg" bytes, "txt"), Hugging Face's Image feature ("image"), path lists, img2dataset's url lists.
IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "path", "filepath", "filename", "file_name", "url")
CAPTION_COLUMNS = ("caption", "txt", "text")
TABLE_FORMATS = (".csv", ".tsv", ".parquet")
COPIED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what the loader decodes
RESIZE_MODES = ("shorter", "center-crop")
PARQUET_BATCH_ROWS = 128  # bounds memory when the table holds the image bytes
ROWS_PER_TASK = 16
LOGGED_SKIPS_PER_REASON = 20


class InputError(ValueError):
    """Bad input or arguments; main prints it as one line."""


# ---------------------------------------------------------------------------------------------
# Shards


class ShardSink:
    """Cuts samples into shards of ``shard_size``. Each shard is written under a hidden temporary
    name and renamed to ``PREFIX-NNNNNN.tar`` once closed and synced, so a file with a shard's
    name is always a complete shard, even after a crash."""

    def __init__(self, out_dir: str, prefix: str, shard_size: int, first_shard: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.next_shard = first_shard
        self._file: Optional[io.BufferedWriter] = None
        self._tar: Optional[wds.TarWriter] = None
        self._count = 0

    def add(self, sample: dict) -> Optional[ShardInfo]:
        """Write one sample; returns the shard it completed, if it did."""
        if self._tar is None:
            self._file = open(partial_shard_path(self.out_dir, shard_name(self.prefix, self.next_shard)), "wb")
            # A fixed mtime makes the tars byte-reproducible. An int, not 0.0: a float mtime makes
            # tarfile add a PAX record to every member, doubling the header parsing on read.
            self._tar = wds.TarWriter(self._file, mtime=0)
            self._count = 0
        self._tar.write(sample)
        self._count += 1
        return self._complete() if self._count == self.shard_size else None

    def finish(self) -> Optional[ShardInfo]:
        """Complete the last, shorter shard, if one is open."""
        return self._complete() if self._tar is not None else None

    def _complete(self) -> ShardInfo:
        name = shard_name(self.prefix, self.next_shard)
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename must not reach the disk before the data
        self._file.close()
        os.replace(partial_shard_path(self.out_dir, name), os.path.join(self.out_dir, name))
        self._tar = self._file = None
        self.next_shard += 1
        return ShardInfo(name, self._count)

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:  # interrupted: the partial file stays hidden; a rerun rewrites it
            self._file.close()


def write_samples(samples: Iterable[dict], out_dir: str, prefix: str, shard_size: int) -> list[ShardInfo]:
    """Write WebDataset samples (dicts with ``__key__`` and one entry per file extension) into
    shards of ``shard_size`` samples, then the index. Returns the shards written."""
    remove_index(out_dir, prefix)
    shards = []
    with ShardSink(out_dir, prefix, shard_size) as sink:
        for sample in samples:
            completed = sink.add(sample)
            if completed is not None:
                shards.append(completed)
        completed = sink.finish()
        if completed is not None:
            shards.append(completed)
    write_index(out_dir, prefix, shards)
    return shards


# ---------------------------------------------------------------------------------------------
# Input tables


@dataclass(frozen=True)
class Table:
    path: str
    image_dir: str  # relative image paths are resolved against this folder
    image_column: str = ""
    caption_column: str = ""


@dataclass(frozen=True)
class Row:
    index: int  # position over all tables: the sample key
    image: object  # bytes, a path, a Hugging Face {"bytes", "path"} struct, or None
    caption: object  # str, bytes or None
    image_dir: str
    image_column: str


def find_tables(inputs: list[str], images_dir: Optional[str]) -> list[Table]:
    """The tables named, a folder standing for its tables in name order."""
    tables = []
    for given in inputs:
        if os.path.isdir(given):
            paths = sorted(os.path.join(given, n) for n in os.listdir(given) if n.lower().endswith(TABLE_FORMATS))
            if not paths:
                raise InputError(f"{given}: the folder holds no {'/'.join(TABLE_FORMATS)} table")
        elif os.path.isfile(given):
            if not given.lower().endswith(TABLE_FORMATS):
                raise InputError(f"{given}: not a table; expected a {'/'.join(TABLE_FORMATS)} file or a folder of them")
            paths = [given]
        else:
            raise InputError(f"{given}: no such file or folder")
        tables.extend(Table(p, images_dir if images_dir is not None else os.path.dirname(os.path.abspath(p))) for p in paths)
    return tables


def parquet_module(path: str):
    try:
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow: pip install 'clipdist[parquet]'") from None
    return pyarrow.parquet


def open_parquet(path: str):
    pq = parquet_module(path)
    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError ... for a file that is not parquet
        raise InputError(f"{path}: not a readable parquet file: {error}") from None


def open_csv(path: str):
    # surrogateescape: a caption that is not UTF-8 skips its row instead of failing the file
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def csv_delimiter(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


def table_columns(table: Table) -> list[str]:
    if table.path.lower().endswith(".parquet"):
        return list(open_parquet(table.path).schema_arrow.names)
    with open_csv(table.path) as f:
        return list(next(csv.reader(f, delimiter=csv_delimiter(table.path)), []))


def choose_column(columns: list[str], requested: Optional[str], candidates: tuple[str, ...], flag: str, path: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise InputError(f"{path}: no column {requested!r} ({flag}); it has {columns}")
        return requested
    found = next((name for name in candidates if name in columns), None)
    if found is None:
        raise InputError(f"{path}: none of the columns {list(candidates)}; name yours with {flag} (it has {columns})")
    return found


def with_columns(tables: list[Table], image_col: Optional[str], caption_col: Optional[str]) -> list[Table]:
    """Each table with its image and caption column chosen, all checked before anything is written."""
    chosen = []
    for table in tables:
        columns = table_columns(table)
        image = choose_column(columns, image_col, IMAGE_COLUMNS, "--image-col", table.path)
        caption = choose_column(columns, caption_col, CAPTION_COLUMNS, "--caption-col", table.path)
        if image == caption:
            raise InputError(f"{table.path}: column {image!r} cannot be both the image and the caption")
        chosen.append(Table(table.path, table.image_dir, image, caption))
    return chosen


def csv_rows(table: Table, base: int, start: int) -> Iterator[Row]:
    """Rows from position ``start`` on (``base`` is the table's first); returns the row count."""
    csv.field_size_limit(2**31 - 1)  # long captions are data, not a malformed file
    count = 0
    with open_csv(table.path) as f:
        reader = csv.DictReader(f, delimiter=csv_delimiter(table.path))
        try:
            for count, record in enumerate(reader, 1):
                if base + count - 1 >= start:
                    yield Row(base + count - 1, record[table.image_column], record[table.caption_column], table.image_dir,
                              table.image_column)
        except csv.Error as error:
            raise InputError(f"{table.path}, line {reader.line_num}: {error}") from None
    return count


def parquet_rows(table: Table, base: int, start: int) -> Iterator[Row]:
    """Rows from position ``start`` on; row groups before it are not read. Returns the row count."""
    parquet = open_parquet(table.path)
    position = base
    for group in range(parquet.metadata.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        if position + group_rows <= start:
            position += group_rows
            continue
        batches = parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=[group], columns=[table.image_column, table.caption_column])
        for batch in batches:
            images = batch.column(table.image_column).to_pylist()
            captions = batch.column(table.caption_column).to_pylist()
            for image, caption in zip(images, captions):
                if position >= start:
                    yield Row(position, image, caption, table.image_dir, table.image_column)
                position += 1
    return parquet.metadata.num_rows


def iter_rows(tables: list[Table], start: int = 0) -> Iterator[Row]:
    """Rows of all tables in order, numbered over all of them, from position ``start`` on."""
    base = 0
    for table in tables:
        reader = parquet_rows if table.path.lower().endswith(".parquet") else csv_rows
        base += yield from reader(table, base, start)


# ---------------------------------------------------------------------------------------------
# Rows to samples


@dataclass(frozen=True)
class ImageOptions:
    resize: Optional[int] = None  # shorter side at most this many pixels; None: images kept as they are
    resize_mode: str = "shorter"  # or "center-crop": then also cut to the centre square
    jpeg_quality: int = 95


@dataclass(frozen=True)
class Prepared:
    index: int
    sample: Optional[dict]  # None when the row is skipped
    skip_reason: str = ""
    detail: str = ""
    image_bytes: int = 0


class Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def checked_caption(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise Skip("caption_not_utf8", f"caption is not UTF-8: {error}") from None
    elif isinstance(value, str):
        try:
            value.encode("utf-8")  # a CSV read with surrogateescape holds bad bytes as surrogates
        except UnicodeEncodeError:
            raise Skip("caption_not_utf8", "caption is not UTF-8") from None
    elif value is not None:
        value = str(value)
    if value is None or not value.strip():
        raise Skip("empty_caption", "empty caption")
    return value


def image_file(value: str, image_dir: str) -> bytes:
    path = value
    if path.startswith("file://"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(path).path)
    elif not is_local(path):
        raise Skip("remote_url", f"{value}: a URL; download the images first (e.g. with img2dataset)")
    path = os.path.join(image_dir, path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise Skip("missing_image", f"{path}: no such file") from None
    except OSError as error:
        raise Skip("unreadable_image", f"{path}: {error}") from None


def image_data(row: Row) -> tuple[bytes, Optional[str]]:
    """The image's encoded bytes, and the path they came from (None for bytes in the table)."""
    value = row.image
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value), None
    if isinstance(value, str) and value.strip():
        return image_file(value, row.image_dir), value
    raise Skip("missing_image", f"no image in column {row.image_column!r}")


def resize_plan(width: int, height: int, options: ImageOptions) -> tuple[Optional[tuple[int, int]], Optional[tuple]]:
    """(size to scale to, centre box to cut), each None when not needed. Never enlarges."""
    if options.resize is None:
        return None, None
    scaled = resized_size(width, height, options.resize) if min(width, height) > options.resize else None
    width, height = scaled or (width, height)
    crop = center_crop_box(width, height, min(width, height)) if options.resize_mode == "center-crop" and width != height else None
    return scaled, crop


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def encode_image(data: bytes, options: ImageOptions) -> tuple[str, bytes, dict]:
    """(extension, bytes to store, size metadata). An image that needs no change keeps its
    original bytes, after a full decode so that a corrupt file is caught here, not in training."""
    with Image.open(io.BytesIO(data)) as image:
        size = {"original_width": image.width, "original_height": image.height}
        scaled, crop = resize_plan(image.width, image.height, options)
        if scaled is None and crop is None:
            if image.format in COPIED_FORMATS:
                image.load()
                return COPIED_FORMATS[image.format], data, {"width": image.width, "height": image.height, **size}
            # BMP, GIF, TIFF ...: the loader reads only JPEG/PNG/WebP; PNG keeps the pixels exact
            pixels = image.convert("RGB")
            return "png", encoded(pixels, "PNG"), {"width": pixels.width, "height": pixels.height, **size}
        if scaled is not None and image.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4, 1/8 scale while both sides stay >= 2x the target
            image.draft("RGB", (2 * scaled[0], 2 * scaled[1]))
        pixels = image.convert("RGB")
        if scaled is not None:
            pixels = pixels.resize(scaled, Image.Resampling.BICUBIC)
        if crop is not None:
            pixels = pixels.crop(crop)
        data = encoded(pixels, "JPEG", quality=options.jpeg_quality)
        return "jpg", data, {"width": pixels.width, "height": pixels.height, **size}


def prepare_sample(row: Row, options: ImageOptions) -> Prepared:
    """The WebDataset sample for one row, or why the row is skipped."""
    try:
        caption = checked_caption(row.caption)
        data, source = image_data(row)
        try:
            extension, image_bytes, size = encode_image(data, options)
        except Image.DecompressionBombError as error:
            raise Skip("image_too_large", str(error)) from None
        except UnidentifiedImageError:
            raise Skip("unreadable_image", f"{source or 'image bytes'}: not an image format PIL knows") from None
        except Exception as error:  # PIL's plugins raise many types on corrupt data; one bad file must not end the run
            raise Skip("unreadable_image", f"{source or 'image bytes'}: {type(error).__name__}: {error}") from None
    except Skip as skip:
        return Prepared(row.index, None, skip.reason, str(skip))
    meta = {"caption": caption, **({row.image_column: source} if source is not None else {}), **size}
    sample = {"__key__": f"{row.index:09d}", extension: image_bytes, "txt": caption, "json": meta}
    return Prepared(row.index, sample, image_bytes=len(image_bytes))


def prepare_batch(rows: list[Row], options: ImageOptions) -> list[Prepared]:
    return [prepare_sample(row, options) for row in rows]


def prepared_samples(rows: Iterator[Row], options: ImageOptions, workers: int) -> Iterator[Prepared]:
    """``prepare_sample`` over the rows, in row order; with workers > 1 in a process pool that
    holds at most 2 tasks per worker, so a table of image bytes is never read far ahead."""
    if workers <= 1:
        yield from (prepare_sample(row, options) for row in rows)
        return
    prepare = functools.partial(prepare_batch, options=options)
    with multiprocessing.Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        while True:
            rows_of_task = list(itertools.islice(rows, ROWS_PER_TASK))
            if rows_of_task:
                pending.append(pool.apply_async(prepare, (rows_of_task,)))
            if pending and (len(pending) >= 2 * workers or not rows_of_task):
                yield from pending.popleft().get()
            elif not pending:
                return


# ---------------------------------------------------------------------------------------------
# Progress, stats and resuming


@dataclass
class Progress:
    """Counts over the rows read so far. Saved as the stats at every completed shard: a rerun
    starts reading at ``rows`` and writing at shard ``shards``."""

    rows: int = 0
    samples: int = 0
    shards: int = 0
    image_bytes: int = 0
    shard_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def stats(self, settings: dict, complete: bool) -> dict:
        return {
            "complete": complete,
            "rows_read": self.rows,
            "samples_written": self.samples,
            "shards_written": self.shards,
            "skipped_total": sum(self.skipped.values()),
            "skipped": dict(sorted(self.skipped.items())),
            "image_bytes": self.image_bytes,
            "shard_bytes": self.shard_bytes,
            "settings": settings,
        }

    @classmethod
    def of_stats(cls, stats: dict) -> "Progress":
        return cls(stats["rows_read"], stats["samples_written"], stats["shards_written"], stats["image_bytes"],
                   stats["shard_bytes"], Counter(stats["skipped"]))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def writer_settings(tables: list[Table], shard_size: int, options: ImageOptions) -> dict:
    """Everything the shards' bytes depend on; a rerun resumes only when this is unchanged."""
    inputs = [
        {"path": os.path.abspath(t.path), "sha256": file_sha256(t.path), "image_dir": os.path.abspath(t.image_dir),
         "image_column": t.image_column, "caption_column": t.caption_column}
        for t in tables
    ]
    return {"inputs": inputs, "shard_size": shard_size, "resize": options.resize, "resize_mode": options.resize_mode,
            "jpeg_quality": options.jpeg_quality}


def previous_stats(out_dir: str, prefix: str, settings: dict) -> Optional[dict]:
    """The stats of an earlier run into this folder with the same settings; None if there was none."""
    path = stats_path(out_dir, prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            stats = json.load(f)
        Progress.of_stats(stats)
        recorded = stats["settings"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: unreadable ({error}); delete it and the {prefix}-* shards to start over") from None
    changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
    if changed:
        raise InputError(f"{path}: an earlier run with other {', '.join(changed)} wrote here; use another --out, or "
                         f"delete {prefix}-* there to start over")
    return stats


def resume_point(out_dir: str, prefix: str, stats: Optional[dict]) -> Progress:
    """Where the earlier run's stats say it stood, if its shards are still there as written."""
    if stats is None:
        return Progress()
    done = Progress.of_stats(stats)
    paths = [os.path.join(out_dir, shard_name(prefix, i)) for i in range(done.shards)]
    if not all(os.path.isfile(p) for p in paths) or sum(map(os.path.getsize, paths)) != done.shard_bytes:
        logger.warning("%s: the shards it lists are missing or changed; writing all shards again", stats_path(out_dir, prefix))
        return Progress()
    return done


def shard_infos(prefix: str, progress: Progress, shard_size: int) -> list[ShardInfo]:
    """Every shard but the last is full: shards are completed when full, the last at the end."""
    return [ShardInfo(shard_name(prefix, i), min(shard_size, progress.samples - i * shard_size)) for i in range(progress.shards)]


def write_stats(out_dir: str, prefix: str, stats: dict) -> None:
    write_text_atomically(stats_path(out_dir, prefix), json.dumps(stats, indent=1) + "\n")


def log_skip(prepared: Prepared, logged: Counter) -> None:
    logged[prepared.skip_reason] += 1
    if logged[prepared.skip_reason] <= LOGGED_SKIPS_PER_REASON:
        suffix = " (further skips for this reason are counted, not logged)" if logged[prepared.skip_reason] == LOGGED_SKIPS_PER_REASON else ""
        logger.warning("skipping row %d (%s): %s%s", prepared.index, prepared.skip_reason, prepared.detail, suffix)


def write_shards(tables: list[Table], out_dir: str, *, prefix: str = "train", shard_size: int = 1000,
                 options: ImageOptions = ImageOptions(), image_col: Optional[str] = None, caption_col: Optional[str] = None,
                 workers: int = 1) -> dict:
    """Write the tables' rows as shards, resuming an interrupted run into ``out_dir``; returns the stats."""
    if shard_size < 1:
        raise InputError(f"--shard-size must be >= 1, got {shard_size}")
    tables = with_columns(tables, image_col, caption_col)
    settings = writer_settings(tables, shard_size, options)
    previous = previous_stats(out_dir, prefix, settings)
    progress = resume_point(out_dir, prefix, previous)
    if previous is not None and previous["complete"] and progress.shards == previous["shards_written"]:
        if read_index(out_dir, prefix) is None:
            write_index(out_dir, prefix, shard_infos(prefix, progress, shard_size))
        logger.info("%s: already complete", stats_path(out_dir, prefix))
        return previous
    remove_index(out_dir, prefix)  # shards are about to change; the index marks a complete set
    if progress.shards:
        logger.info("resuming after %d complete shard(s), at row %d", progress.shards, progress.rows)
    logged: Counter = Counter()

    def shard_completed(info: Optional[ShardInfo]) -> None:
        if info is not None:
            progress.shards += 1
            progress.shard_bytes += os.path.getsize(os.path.join(out_dir, info.url))
            write_stats(out_dir, prefix, progress.stats(settings, complete=False))

    rows = iter_rows(tables, start=progress.rows)
    with ShardSink(out_dir, prefix, shard_size, first_shard=progress.shards) as sink:
        for prepared in tqdm(prepared_samples(rows, options, workers), desc="writing shards", unit="row", initial=progress.rows):
            progress.rows += 1
            if prepared.sample is None:
                progress.skipped[prepared.skip_reason] += 1
                log_skip(prepared, logged)
                continue
            progress.samples += 1
            progress.image_bytes += prepared.image_bytes
            shard_completed(sink.add(prepared.sample))
        shard_completed(sink.finish())

    write_index(out_dir, prefix, shard_infos(prefix, progress, shard_size))
    if os.path.exists(os.path.join(out_dir, shard_name(prefix, progress.shards))):
        logger.warning("%s: shards numbered from %d on are left from an earlier run; the index lists only the %d written",
                       out_dir, progress.shards, progress.shards)
    stats = progress.stats(settings, complete=True)
    write_stats(out_dir, prefix, stats)
    return stats


# ---------------------------------------------------------------------------------------------
# Command line


def default_workers() -> int:
    """The CPUs this process may use (a Slurm allocation, not the whole node), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", "--captions", dest="inputs", nargs="+", required=True, metavar="TABLE",
                        help="CSV/TSV/parquet tables, or folders of them, one row per image (--captions: the old name)")
    parser.add_argument("--images", help="folder that relative image paths are resolved against (default: each table's folder)")
    parser.add_argument("--image-col", help=f"column with the image path or bytes (default: the first of {', '.join(IMAGE_COLUMNS)})")
    parser.add_argument("--caption-col", help=f"column with the caption (default: the first of {', '.join(CAPTION_COLUMNS)})")
    parser.add_argument("--out", required=True, help="output folder for the shards, the index and the stats")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="train", help="shard names are PREFIX-000000.tar ...")
    parser.add_argument("--resize", type=positive_int, metavar="N",
                        help="scale images whose shorter side exceeds N down to N (aspect kept) and store them as JPEG; "
                             "smaller images are never enlarged")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="shorter",
                        help="with --resize: 'center-crop' also cuts every image to its centre square")
    parser.add_argument("--jpeg-quality", type=int, choices=range(1, 101), default=95, metavar="1..100",
                        help="quality of images re-encoded by --resize (default 95)")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="processes decoding and resizing images (default: CPU cores, at most 8)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = ImageOptions(args.resize, args.resize_mode, args.jpeg_quality)
    try:
        stats = write_shards(find_tables(args.inputs, args.images), args.out, prefix=args.prefix, shard_size=args.shard_size,
                             options=options, image_col=args.image_col, caption_col=args.caption_col, workers=args.workers)
    except InputError as error:
        sys.exit(f"write_shards: {error}")
    num_shards = stats["shards_written"]
    print(f"wrote {stats['samples_written']} samples in {num_shards} shard(s) to {args.out}; "
          f"index {index_path(args.out, args.prefix)}, stats {stats_path(args.out, args.prefix)}")
    if stats["skipped_total"]:
        print(f"skipped {stats['skipped_total']} of {stats['rows_read']} rows: {stats['skipped']}")
    if num_shards:
        print(f"data.train_urls=\"'{url_pattern(args.out, args.prefix, num_shards)}'\"  (quoted for the shell and Hydra)")


if __name__ == "__main__":
    main()
