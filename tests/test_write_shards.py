"""The shard writer on CSV and parquet tables: skipped rows counted by reason, optional resize,
and resuming after a real kill with the same bytes as an uninterrupted run. The shards are read
back with the training loader's own readers (iter_shard, shard_sample_counts)."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from clipdist.config import expand_urls
from clipdist.data.pipeline import iter_shard, shard_sample_counts
from clipdist.data.shards import read_index, url_pattern
from clipdist.data.write_shards import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Helpers


def random_pixels(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def gradient_pixels(width: int, height: int) -> np.ndarray:
    """Smooth, so that any good downscaler lands close to a block mean."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return np.stack([200 * x + 20, 200 * y + 20, 100 * (x + y) + 20], axis=-1).round().astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)


def write_csv(path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_parquet(path, columns: dict, row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def run_writer(*args) -> None:
    main([str(a) for a in args])


def read_stats(out_dir, prefix: str = "train") -> dict:
    return json.loads((out_dir / f"{prefix}-stats.json").read_text())


def read_back(out_dir, prefix: str = "train") -> list[dict]:
    """Every sample, through the loader's readers; the index's counts must equal what the tars hold."""
    index = read_index(str(out_dir), prefix)
    urls = tuple(expand_urls(url_pattern(str(out_dir), prefix, len(index))))
    assert [os.path.basename(u) for u in urls] == [s.url for s in index], "the printed pattern names exactly the shards"
    per_shard = [list(iter_shard(url)) for url in urls]
    assert [s.samples for s in shard_sample_counts(urls)] == [len(samples) for samples in per_shard]
    return [sample for samples in per_shard for sample in samples]


def inode(path) -> tuple[int, int]:
    """Changes when a file is replaced (the writer renames a new file over the old)."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns


def folder_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------------
# Inputs


def test_csv_of_paths_skips_bad_rows_and_counts_them(tmp_path, capsys):
    """Reference: the image files and rows written here. Paths are relative to the table's
    folder, absolute, or file:// URLs; bad rows are skipped by reason, good ones keep their
    original bytes (a BMP, which the loader cannot read, becomes a lossless PNG)."""
    images = tmp_path / "images"
    images.mkdir()
    files = {
        "a0.png": encode(random_pixels(12, 10, 0), "PNG"),
        "a1.jpg": encode(random_pixels(9, 14, 1), "JPEG"),
        "a5.webp": encode(random_pixels(8, 8, 5), "WEBP", lossless=True),
        "a7.png": encode(random_pixels(8, 8, 7), "PNG"),
        "a8.bmp": encode(random_pixels(11, 7, 8), "BMP"),
        "a9.png": encode(random_pixels(6, 9, 9), "PNG"),
        "a11.png": encode(random_pixels(10, 10, 11), "PNG"),
        "a3.png": encode(random_pixels(8, 8, 3), "PNG"),
    }
    truncated = encode(random_pixels(64, 64, 6), "JPEG")
    files["broken.jpg"] = truncated[: len(truncated) // 2]  # the header opens; the full decode fails
    for name, data in files.items():
        (images / name).write_bytes(data)
    rows = [
        ["images/a0.png", "first"],
        [str(images / "a1.jpg"), "an absolute path"],
        ["images/missing.png", "no such file"],  # missing_image
        ["images/a3.png", ""],  # empty_caption
        ["images/a3.png", "   "],  # empty_caption
        ["images/a5.webp", "a webp"],
        ["images/broken.jpg", "cut in half"],  # unreadable_image
        ["images/a7.png", "LATIN1"],  # caption_not_utf8 (raw byte swapped in below)
        ["images/a8.bmp", "a bitmap"],
        [(images / "a9.png").as_uri(), "a file URL"],
        ["https://example.com/x.jpg", "remote"],  # remote_url
        ["images/a11.png", 'ünïcode, with a comma and "quotes"'],
    ]
    write_csv(tmp_path / "table.csv", ["path", "caption"], rows)
    table = (tmp_path / "table.csv").read_bytes().replace(b"LATIN1", b"caf\xe9")
    (tmp_path / "table.csv").write_bytes(table)

    out = tmp_path / "out"
    run_writer("--input", tmp_path / "table.csv", "--out", out, "--shard-size", 4, "--workers", 1)
    assert "skipped 6 of 12 rows" in capsys.readouterr().out

    samples = read_back(out)
    good = [0, 1, 5, 8, 9, 11]
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in good]
    stored_image_bytes = 0
    for row_index, sample in zip(good, samples):
        cell, caption = rows[row_index]
        name = os.path.basename(cell)
        extension = {".png": "png", ".jpg": "jpg", ".webp": "webp", ".bmp": "png"}[os.path.splitext(name)[1]]
        data = sample[extension]
        stored_image_bytes += len(data)
        if name.endswith(".bmp"):
            assert np.array_equal(decode(data), decode(files[name])), "BMP re-encoded losslessly"
        else:
            assert data == files[name], f"{name}: original bytes kept"
        assert sample["txt"].decode() == caption
        width, height = Image.open(io.BytesIO(files[name])).size
        assert json.loads(sample["json"]) == {"caption": caption, "path": cell, "width": width, "height": height,
                                              "original_width": width, "original_height": height}

    stats = read_stats(out)
    assert stats["complete"] is True
    assert (stats["rows_read"], stats["samples_written"], stats["shards_written"], stats["skipped_total"]) == (12, 6, 2, 6)
    assert stats["skipped"] == {"caption_not_utf8": 1, "empty_caption": 2, "missing_image": 1, "remote_url": 1,
                                "unreadable_image": 1}
    assert stats["image_bytes"] == stored_image_bytes
    assert stats["shard_bytes"] == sum(os.path.getsize(out / f"train-00000{i}.tar") for i in range(2))


def test_parquet_of_bytes_parallel_and_resumed_runs_are_identical(tmp_path):
    """A folder of parquet files: img2dataset's output columns (jpg bytes, txt, plus a url
    column that must not be taken for the image), Hugging Face's Image struct with a binary
    caption column, and 60 more rows so that 2 workers run several tasks. Keys run on across the
    files. 2 workers give the same bytes as 1; a run stopped after a shard was renamed but before
    the stats recorded it resumes to the same bytes."""
    parts = tmp_path / "parts"
    parts.mkdir()
    jpegs = [encode(random_pixels(10, 8 + i % 5, 100 + i), "JPEG") for i in range(71)]
    write_parquet(parts / "part-0.parquet", {
        "url": [f"https://example.com/{i}.jpg" for i in range(6)],
        "jpg": [jpegs[0], b"not an image", None, jpegs[3], jpegs[4], jpegs[5]],
        "txt": ["zero", "one", "two", "three", None, "five"],
    }, row_group_size=3)
    write_parquet(parts / "part-1.parquet", {
        "image": [{"bytes": jpegs[i], "path": f"{i}.jpg"} for i in range(6, 11)],
        "caption": [b"six", b"\xff seven", b"eight", b"nine", b"ten"],
    }, row_group_size=2)
    write_parquet(parts / "part-2.parquet", {"jpg": jpegs[11:], "txt": [f"row {i}" for i in range(11, 71)]}, row_group_size=16)

    def write(out, workers):
        run_writer("--input", parts, "--out", out, "--shard-size", 4, "--workers", workers)

    write(tmp_path / "serial", 1)
    write(tmp_path / "parallel", 2)
    reference = folder_bytes(tmp_path / "serial")
    assert folder_bytes(tmp_path / "parallel") == reference

    samples = read_back(tmp_path / "serial")
    good = {0: "zero", 3: "three", 5: "five", 6: "six", 8: "eight", 9: "nine", 10: "ten", **{i: f"row {i}" for i in range(11, 71)}}
    assert [(s["__key__"], s["txt"].decode()) for s in samples] == [(f"{i:09d}", c) for i, c in good.items()]
    assert [s["jpg"] for s in samples] == [jpegs[i] for i in good]
    assert "path" not in json.loads(samples[0]["json"]), "bytes from the table: no path to record"
    stats = read_stats(tmp_path / "serial")
    assert (stats["rows_read"], stats["samples_written"], stats["shards_written"]) == (71, 67, 17)
    assert stats["skipped"] == {"caption_not_utf8": 1, "empty_caption": 1, "missing_image": 1, "unreadable_image": 1}
    columns = [(i["image_column"], i["caption_column"]) for i in stats["settings"]["inputs"]]
    assert columns == [("jpg", "txt"), ("image", "caption"), ("jpg", "txt")]

    # The state a kill leaves right after shard 1 was renamed, before the stats counted it, while
    # shard 2 was being written: the stats stand at shard 0 (rows 0-6, samples 0, 3, 5, 6), so
    # the rerun starts inside part-1's first row group; shard 1 is on disk uncounted, shard 2 is
    # a partial file.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (resumed / name).write_bytes(reference[name])
    stats_then = {**stats, "complete": False, "rows_read": 7, "samples_written": 4, "shards_written": 1,
                  "skipped_total": 3, "skipped": {"empty_caption": 1, "missing_image": 1, "unreadable_image": 1},
                  "image_bytes": sum(len(jpegs[i]) for i in (0, 3, 5, 6)), "shard_bytes": len(reference["train-000000.tar"])}
    (resumed / "train-stats.json").write_text(json.dumps(stats_then))
    (resumed / ".train-000002.tar.partial").write_bytes(b"half a tar")
    kept, uncounted = inode(resumed / "train-000000.tar"), inode(resumed / "train-000001.tar")
    write(resumed, 1)
    assert folder_bytes(resumed) == reference
    assert inode(resumed / "train-000000.tar") == kept, "a counted shard is kept, not rewritten"
    assert inode(resumed / "train-000001.tar") != uncounted, "an uncounted shard is rewritten"


def test_resize_shorter_side_and_center_crop(tmp_path):
    """--resize 10: the shorter side becomes 10 (aspect kept), stored as JPEG; images already
    that small keep their bytes. Reference: the block mean of the smooth source image; the
    bicubic resize plus JPEG q95 stays within a mean 3 and max 16 grey levels of it."""
    images = {
        "wide.png": gradient_pixels(40, 20),  # 2x2 blocks
        "big.jpg": gradient_pixels(160, 80),  # 8x8 blocks; JPEG decoded at reduced scale first
        "small.jpg": random_pixels(8, 6, 0),  # shorter side already <= 10
    }
    params = {"big.jpg": {"quality": 98}}
    for name, pixels in images.items():
        (tmp_path / name).write_bytes(encode(pixels, "PNG" if name.endswith("png") else "JPEG", **params.get(name, {})))
    grey = (np.arange(30 * 60).reshape(60, 30) % 256).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    names = ["wide.png", "big.jpg", "small.jpg", "grey.png"]
    write_csv(tmp_path / "table.csv", ["filename", "caption"], [[n, f"image {n}"] for n in names])

    def block_mean(pixels: np.ndarray, block: int) -> np.ndarray:
        h, w, c = pixels.shape
        return pixels.reshape(h // block, block, w // block, block, c).mean(axis=(1, 3))

    def close_to(data: bytes, reference: np.ndarray) -> None:
        diff = np.abs(decode(data) - reference)
        assert diff.mean() < 3 and diff.max() < 16, f"mean {diff.mean():.2f}, max {diff.max():.2f}"

    for mode in ("shorter", "center-crop"):
        out = tmp_path / mode
        run_writer("--input", tmp_path / "table.csv", "--out", out, "--resize", 10, "--resize-mode", mode, "--workers", 1)
        samples = {json.loads(s["json"])["filename"]: s for s in read_back(out)}
        sizes = {n: (json.loads(s["json"])["width"], json.loads(s["json"])["height"]) for n, s in samples.items()}
        wide_ref = block_mean(gradient_pixels(40, 20).astype(np.float64), 2)
        big_ref = block_mean(gradient_pixels(160, 80).astype(np.float64), 8)
        if mode == "shorter":
            assert sizes == {"wide.png": (20, 10), "big.jpg": (20, 10), "small.jpg": (8, 6), "grey.png": (10, 20)}
            assert samples["small.jpg"]["jpg"] == (tmp_path / "small.jpg").read_bytes(), "not enlarged, not re-encoded"
            close_to(samples["wide.png"]["jpg"], wide_ref)
            close_to(samples["big.jpg"]["jpg"], big_ref)
        else:
            assert sizes == {"wide.png": (10, 10), "big.jpg": (10, 10), "small.jpg": (6, 6), "grey.png": (10, 10)}
            close_to(samples["wide.png"]["jpg"], wide_ref[:, 5:15])
            close_to(samples["big.jpg"]["jpg"], big_ref[:, 5:15])
            assert np.array_equal(decode(samples["small.jpg"]["jpg"]).shape, (6, 6, 3))
        for name, sample in samples.items():
            assert set(sample) >= {"jpg", "txt", "json"} and Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
            meta = json.loads(sample["json"])
            assert (meta["original_width"], meta["original_height"]) == Image.open(tmp_path / name).size
            assert Image.open(io.BytesIO(sample["jpg"])).size == sizes[name]
        assert read_stats(out)["settings"]["resize_mode"] == mode


# ---------------------------------------------------------------------------------------------
# Resuming after a kill


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    """A real writer process is SIGKILLed mid-shard, while it waits on a FIFO that stands in for
    one image file: shards 0-1 are complete, shard 2 is half written. The FIFO is then replaced
    by the real image and the same command continues: every file equals an uninterrupted run's."""
    images = tmp_path / "images"
    images.mkdir()
    names = [f"{i}.png" for i in range(14)]
    for i, name in enumerate(names):
        (images / name).write_bytes(encode(random_pixels(8, 8, i), "PNG"))
    (images / "2.png").unlink()  # missing_image
    (images / "11.png").write_bytes(b"\x89PNG broken")  # unreadable_image
    captions = [f"caption {i}" for i in range(14)]
    captions[5] = ""  # empty_caption
    write_csv(tmp_path / "table.csv", ["filename", "caption"], [[n, c] for n, c in zip(names, captions)])
    args = ["--input", tmp_path / "table.csv", "--images", images, "--shard-size", 3, "--workers", 1]

    uninterrupted = tmp_path / "uninterrupted"
    run_writer(*args, "--out", uninterrupted)
    assert len(read_back(uninterrupted)) == 11
    assert [s.samples for s in read_index(str(uninterrupted), "train")] == [3, 3, 3, 2]

    # Rows 0-7 fill shards 0 and 1, row 8 opens shard 2, row 9's image is a FIFO: open() blocks.
    fifo_image = (images / "9.png").read_bytes()
    (images / "9.png").unlink()
    os.mkfifo(images / "9.png")
    resumed = tmp_path / "resumed"
    log = tmp_path / "writer.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "clipdist.data.write_shards", *map(str, args), "--out", str(resumed)],
                                   cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        writer_end = wait_for_fifo_reader(images / "9.png", process, log)
        process.kill()
        process.wait(timeout=30)
        os.close(writer_end)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert sorted(os.listdir(resumed)) == [".train-000002.tar.partial", "train-000000.tar", "train-000001.tar", "train-stats.json"]
    stats = read_stats(resumed)
    assert (stats["complete"], stats["shards_written"], stats["rows_read"]) == (False, 2, 8)
    assert stats["skipped"] == {"empty_caption": 1, "missing_image": 1}

    (images / "9.png").unlink()
    (images / "9.png").write_bytes(fifo_image)
    complete = [inode(resumed / f"train-00000{i}.tar") for i in range(2)]
    run_writer(*args, "--out", resumed)
    assert folder_bytes(resumed) == folder_bytes(uninterrupted)
    assert [inode(resumed / f"train-00000{i}.tar") for i in range(2)] == complete, "complete shards are kept"
    stats = read_stats(resumed)
    assert (stats["complete"], stats["rows_read"], stats["samples_written"]) == (True, 14, 11)
    assert stats["skipped"] == {"empty_caption": 1, "missing_image": 1, "unreadable_image": 1}


def wait_for_fifo_reader(path, process: subprocess.Popen, log, timeout: float = 120.0) -> int:
    """Open the FIFO's write end once the writer is blocked opening it for reading (before
    that, a non-blocking open fails with ENXIO). Holding it open keeps the reader blocked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"writer exited early ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
        time.sleep(0.05)
    raise AssertionError("the writer never reached the FIFO row")


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_arguments_fail_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.png").write_bytes(encode(random_pixels(8, 8, 0), "PNG"))
    write_csv(tmp_path / "table.csv", ["file", "text"], [["a.png", "a caption"]])

    def error_of(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_writer(*args)
        message = str(exit_info.value.code)
        assert "\n" not in message
        return message

    out = tmp_path / "out"
    message = error_of("--input", tmp_path / "table.csv", "--out", out)
    assert "table.csv: none of the columns" in message and "--image-col" in message, message
    assert "no column 'img' (--image-col)" in error_of("--input", tmp_path / "table.csv", "--out", out, "--image-col", "img")
    assert "not a table" in error_of("--input", tmp_path / "a.png", "--out", out)

    run_writer("--input", tmp_path / "table.csv", "--out", out, "--image-col", "file", "--caption-col", "text", "--workers", 1)
    assert read_stats(out)["samples_written"] == 1
    message = error_of("--input", tmp_path / "table.csv", "--out", out, "--image-col", "file", "--caption-col", "text",
                       "--resize", "4")
    assert "other resize wrote here" in message, message

    write_parquet(tmp_path / "t.parquet", {"jpg": [b"x"], "txt": ["y"]}, row_group_size=1)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    assert "reading parquet needs pyarrow: pip install 'clipdist[parquet]'" in error_of("--input", tmp_path / "t.parquet", "--out", out)
