"""Data: preprocessing vs open_clip, shard writing, the digits set, and the exactly-once loaders
on 2 real gloo ranks."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_distributed
from shard_helpers import caption_of, coded_image, decoded_index, key_index, png_bytes, write_indexed_shards
from PIL import Image

from clipdist.config import DataConfig
from clipdist.config import load_config
from clipdist.data.digits import DIGIT_CLASSNAMES, TRAIN_TEMPLATES, ensure_digits_shards, train_caption
from clipdist.data.pipeline import build_eval_loader, build_train_loader, ensure_data
from clipdist.data.sources import iter_shard
from clipdist.data.shards import read_index
from clipdist.data.write_shards import write_samples
from clipdist.models.tokenizer import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_SIZES = [7, 13, 4, 11, 9]  # 44 samples; unequal on purpose


# ---------------------------------------------------------------------------------------------
# Helpers


def epoch_keys(urls: str, *, rank: int, world_size: int, seed: int, epoch: int, num_workers: int, start_step: int = 0,
               local_batch: int = 3) -> dict:
    """Sample indices of each batch one rank gets in one epoch (shuffle window: 2 batches)."""
    cfg = DataConfig(train_urls=urls, local_batch=local_batch, num_workers=num_workers, shuffle_buffer=2 * local_batch)
    loader = build_train_loader(cfg, image_size=8, context_length=16, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
                                start_step=start_step)
    batches = []
    for batch in loader:
        assert batch.images.shape == (local_batch, 3, 8, 8) and batch.tokens.shape == (local_batch, 16)
        indices = [key_index(k) for k in batch.keys]
        # Reference: the writer put image i and caption i under key i; rows must stay paired.
        assert [decoded_index(img) for img in batch.images] == indices, "image rows do not match their keys"
        expected_tokens = tokenize([caption_of(i) for i in indices], context_length=16)
        assert torch.equal(batch.tokens, expected_tokens), "token rows do not match their keys"
        batches.append(indices)
    return {"batches": batches, "steps": len(loader), "dropped": loader.dropped, "skipped": loader.skipped}


# ---------------------------------------------------------------------------------------------
# Shard writer


def test_write_shards_cli_round_trip(tmp_path):
    """Reference: the PNG files and CSV rows written here; a missing file is skipped and counted."""
    images_dir, out_dir = tmp_path / "images", tmp_path / "shards"
    images_dir.mkdir()
    rng = np.random.default_rng(1)
    rows, originals = [], {}
    for i in range(7):
        name = f"img_{i}.png"
        pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / name)
        rows.append({"filename": name, "caption": f"a picture, number {i}, with \"quotes\""})
        originals[name] = pixels
    rows.insert(3, {"filename": "missing.png", "caption": "no such image"})
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "caption"])
        writer.writeheader()
        writer.writerows(rows)

    result = subprocess.run(
        [sys.executable, "-m", "clipdist.data.write_shards", "--images", str(images_dir), "--captions", str(tmp_path / "captions.csv"),
         "--out", str(out_dir), "--shard-size", "3", "--prefix", "demo"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped 1 of 8 rows" in result.stdout and "demo-{000000..000002}.tar" in result.stdout, result.stdout

    index = json.loads((out_dir / "demo-index.json").read_text())
    assert index == {"shards": [{"url": f"demo-00000{i}.tar", "samples": n} for i, n in enumerate([3, 3, 1])], "total": 7}
    samples = [s for i in range(3) for s in iter_shard(str(out_dir / f"demo-00000{i}.tar"))]
    assert len(samples) == 7
    for sample in samples:
        meta = json.loads(sample["json"])
        row = next(r for r in rows if r["filename"] == meta["filename"])
        assert sample["txt"].decode() == row["caption"] == meta["caption"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), originals[meta["filename"]]), "PNG is lossless"


# ---------------------------------------------------------------------------------------------
# Digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    ensure_digits_shards(out)
    return out


def test_digits_shards(digits_dir):
    """Reference: sklearn.datasets.load_digits() has 1,797 images; 300 are held out for eval."""
    train, evaluation = read_index(digits_dir, "train"), read_index(digits_dir, "eval")
    assert len(train) == 4 and len(evaluation) == 2
    assert sum(s.samples for s in train) == 1497 and sum(s.samples for s in evaluation) == 300
    eval_samples = [s for info in evaluation for s in iter_shard(os.path.join(digits_dir, info.url))]
    labels = [int(s["cls"]) for s in eval_samples]
    assert np.bincount(labels).min() >= 28, "stratified split keeps every class in eval"
    image = Image.open(io.BytesIO(eval_samples[0]["png"]))
    assert image.mode == "RGB" and image.size == (32, 32)

    train_captions = {train_caption(label, t) for label in range(10) for t in range(len(TRAIN_TEMPLATES))}
    (zero_shot,) = load_config(["data=digits"])[0].eval.zero_shot
    assert zero_shot.classnames == DIGIT_CLASSNAMES
    prompts = {template.format(name) for template in zero_shot.templates for name in zero_shot.classnames}
    assert not train_captions & prompts, "eval prompts must not occur as training captions"
    first_shard = [s["txt"].decode() for s in iter_shard(os.path.join(digits_dir, train[0].url))]
    assert set(first_shard) <= train_captions and len(set(first_shard)) > 20

    mtimes = {name: os.path.getmtime(os.path.join(digits_dir, name)) for name in os.listdir(digits_dir)}
    info = ensure_digits_shards(digits_dir)
    assert {name: os.path.getmtime(os.path.join(digits_dir, name)) for name in os.listdir(digits_dir)} == mtimes, "rewritten"
    assert info["train_urls"] == os.path.join(digits_dir, "train-{000000..000003}.tar")
    assert info["eval_urls"] == os.path.join(digits_dir, "eval-{000000..000001}.tar")


def test_ensure_data_writes_digits_when_missing(tmp_path):
    cfg = DataConfig(train_urls=str(tmp_path / "d" / "train-{000000..000003}.tar"), generate_digits=True)
    ensure_data(cfg)
    assert sum(s.samples for s in read_index(str(tmp_path / "d"), "train")) == 1497


# ---------------------------------------------------------------------------------------------
# Loaders: single process


def test_bad_samples_are_replaced_and_counted(tmp_path):
    """A corrupt image, an empty caption and a sample without image are each replaced by a good
    row of the same batch; the batch keeps its size and the counts say what happened."""
    good = [{"__key__": f"{i:09d}", "png": png_bytes(coded_image(i)), "txt": caption_of(i)} for i in range(5)]
    bad = [
        {"__key__": "000000005", "jpg": b"\xff\xd8\xff not a jpeg", "txt": caption_of(5)},
        {"__key__": "000000006", "png": png_bytes(coded_image(6)), "txt": "   "},
        {"__key__": "000000007", "txt": caption_of(7)},
    ]
    write_samples(good[:2] + bad + good[2:], str(tmp_path), "mixed", shard_size=100)
    cfg = DataConfig(train_urls=str(tmp_path / "mixed-000000.tar"), local_batch=8, num_workers=0, shuffle_buffer=0)
    loader = build_train_loader(cfg, image_size=8, context_length=16, rank=0, world_size=1, seed=0, epoch=0)
    (batch,) = list(loader)
    indices = [key_index(k) for k in batch.keys]
    assert batch.images.shape[0] == 8 and set(indices) == set(range(5))
    assert [decoded_index(img) for img in batch.images] == indices
    assert loader.skipped == {"bad_image": 1, "no_caption": 1, "no_image": 1, "padded": 3}


def test_pipe_url_without_index(tmp_path):
    """A `pipe:` shard has no index beside it, so its samples are counted by reading it."""
    write_indexed_shards(str(tmp_path), "p", [10], with_class=True)
    url = f"pipe:cat {tmp_path / 'p0-000000.tar'}"
    loader = build_eval_loader(url, image_size=8, rank=0, world_size=1, batch_size=4)
    labels = torch.cat([labels for _, labels in loader])
    assert len(loader) == 3 and labels.tolist() == list(range(10)) + [-1, -1]


# ---------------------------------------------------------------------------------------------
# Loaders: 2 real gloo ranks


def _rank_epochs(rank: int, world_size: int, shard_dir: str, num_workers: int) -> dict:
    train_urls = os.path.join(shard_dir, "t{0..4}-000000.tar")
    out = {
        "e0": epoch_keys(train_urls, rank=rank, world_size=world_size, seed=0, epoch=0, num_workers=num_workers),
        "e0_again": epoch_keys(train_urls, rank=rank, world_size=world_size, seed=0, epoch=0, num_workers=num_workers),
        "e1": epoch_keys(train_urls, rank=rank, world_size=world_size, seed=0, epoch=1, num_workers=num_workers),
        "seed1": epoch_keys(train_urls, rank=rank, world_size=world_size, seed=1, epoch=0, num_workers=num_workers),
        "resumed": epoch_keys(train_urls, rank=rank, world_size=world_size, seed=0, epoch=0, num_workers=num_workers, start_step=3),
        # 2 ranks × 2 workers > 2 shards
        "few_shards": epoch_keys(os.path.join(shard_dir, "t{1..2}-000000.tar"), rank=rank, world_size=world_size, seed=0, epoch=0,
                                 num_workers=num_workers, local_batch=2),
    }
    evaluation = build_eval_loader(os.path.join(shard_dir, "v{0..2}-000000.tar"), image_size=8, rank=rank, world_size=world_size,
                                   batch_size=4, num_workers=num_workers)
    eval_batches = [(decoded_index_rows(images, labels), labels.tolist()) for images, labels in evaluation]
    torch.distributed.barrier()  # the loaders need no collectives; this proves the group is live
    out["eval"] = {"len": len(evaluation), "batches": eval_batches}
    return out


def decoded_index_rows(images: torch.Tensor, labels: torch.Tensor) -> list[int]:
    return [decoded_index(img) if label >= 0 else -1 for img, label in zip(images, labels)]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_and_eval_loaders_on_two_ranks(tmp_path, num_workers):
    """Reference: the 44 keys written (5 shards of unequal size). local_batch 3 × 2 ranks:
    7 steps, 2 samples dropped; each kept key seen by exactly one rank."""
    write_indexed_shards(str(tmp_path), "t", SHARD_SIZES)
    write_indexed_shards(str(tmp_path), "v", [5, 9, 9], with_class=True)  # 23 eval samples
    ranks = run_distributed(_rank_epochs, world_size=2, args=(str(tmp_path), num_workers), timeout=150)

    total = sum(SHARD_SIZES)
    for run in ("e0", "e1", "seed1"):
        per_rank = [r[run] for r in ranks]
        assert [r["steps"] for r in per_rank] == [7, 7] and [len(r["batches"]) for r in per_rank] == [7, 7], "equal steps"
        seen = [i for r in per_rank for b in r["batches"] for i in b]
        assert len(seen) == len(set(seen)) == total - per_rank[0]["dropped"] == 42, f"{run}: exactly once"
        assert set(seen) <= set(range(total)) and all(r["skipped"] == {} for r in per_rank)
    for r in ranks:
        assert r["e0_again"]["batches"] == r["e0"]["batches"], "same seed and epoch, same batches"
        assert r["e1"]["batches"] != r["e0"]["batches"] and r["seed1"]["batches"] != r["e0"]["batches"]
        assert r["resumed"]["batches"] == r["e0"]["batches"][3:], "start_step=3 resumes the uninterrupted epoch"

    few = [r["few_shards"] for r in ranks]  # keys 7..23 in 2 shards, batch 2 × 2 ranks: 4 steps, 1 dropped
    seen = [i for r in few for b in r["batches"] for i in b]
    assert [len(r["batches"]) for r in few] == [4, 4] and few[0]["dropped"] == 1
    assert len(seen) == len(set(seen)) == 16 and set(seen) <= set(range(7, 24))

    evals = [r["eval"] for r in ranks]  # 23 samples: 12 + 11, so 3 batches of 4 on both ranks
    assert [e["len"] for e in evals] == [3, 3] and [len(e["batches"]) for e in evals] == [3, 3]
    labels = [label for e in evals for _, batch_labels in e["batches"] for label in batch_labels if label >= 0]
    assert sorted(labels) == list(range(23)), "each eval label seen once"
    for e in evals:
        for rows, batch_labels in e["batches"]:
            assert rows == batch_labels, "eval images paired with their labels"
