"""Data that clipdist did not write, read where users keep it: img2dataset's real output, shards
behind a real HTTP server on 127.0.0.1 (tests/http_server.py: its request log is the reference
for what was fetched), `pipe:curl` commands, sample counts from every kind of file beside the
shards, remote faults retried then counted, cut tars detected, and the index CLI.

Shards here hold coded samples (tests/shard_helpers.py): sample i has key i, image i and caption
i, so every row is traced to what was written."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUIET_EVAL, entry_point, one_line_error, run_distributed, torchrun
from http_server import ShardServer, complete_samples_before
from shard_helpers import caption_of, decoded_index, key_index, truncate_after, write_shard_set

from clipdist.config import DataConfig, expand_urls
from clipdist.data import DataError, TrainData
from clipdist.data.counts import shard_sample_counts
from clipdist.data.pipeline import build_train_loader
from clipdist.data.sources import TruncatedArchive, iter_shard
from clipdist.distributed import all_reduce_sum
from clipdist.models.tokenizer import tokenize

IMG2DATASET = Path(__file__).parent / "fixtures" / "img2dataset"
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()


def loader_rows(cfg: DataConfig, **kw) -> list:
    loader = build_train_loader(cfg, image_size=8, context_length=16, rank=0, world_size=1, seed=0, epoch=0, **kw)
    return [(key_index(k), decoded_index(image)) for batch in loader for k, image in zip(batch.keys, batch.images)]


def counts(pattern: str) -> list[int]:
    shard_sample_counts.cache_clear()
    return [s.samples for s in shard_sample_counts(tuple(expand_urls(pattern)))]


# ---------------------------------------------------------------------------------------------
# img2dataset's output, as it wrote it


def test_img2dataset_output_is_read_as_is_locally_and_over_http():
    """tests/fixtures/img2dataset is a real img2dataset 1.47.0 run (make_fixture.py): 26 URLs,
    2 of them 404, so 24 samples in 3 shards of jpg + txt + json, with NNNNN_stats.json and
    NNNNN.parquet beside each; and a webp shard. Reference: the stats files' "successes" and
    the captions img2dataset stored ("a handwritten digit <label word>.")."""
    stats = [json.loads((IMG2DATASET / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert [s["successes"] for s in stats] == [9, 9, 6] and sum(s["count"] for s in stats) == 26
    assert counts(str(IMG2DATASET / "{00000..00002}.tar")) == [9, 9, 6]
    with ShardServer(IMG2DATASET) as server:
        assert counts(server.url("{00000..00002}.tar")) == [9, 9, 6]
        assert not server.gets(".tar"), "counts came from the stats files, not from reading the shards"
        assert {r.path for r in server.gets()} == {"/index.json", "/00000_stats.json", "/00001_stats.json", "/00002_stats.json"}

        cfg = DataConfig(train_urls=server.url("{00000..00002}.tar"), local_batch=4, shuffle_buffer=8)
        loader = build_train_loader(cfg, image_size=32, context_length=16, rank=0, world_size=1, seed=0, epoch=0)
        batches = list(loader)
    keys = [k.rsplit("#", 1)[1] for b in batches for k in b.keys]
    assert len(batches) == 6 and sorted(keys) == sorted(set(keys)) and len(keys) == 24
    assert "000003" not in keys and "000014" not in keys and loader.skipped == {}
    for batch in batches:
        assert batch.images.shape == (4, 3, 32, 32)
        for key, tokens in zip(batch.keys, batch.tokens):
            shard, name = key.rsplit("#", 1)
            meta = next(s for s in iter_shard(str(IMG2DATASET / shard.rsplit("/", 1)[1])) if s["__key__"] == name)
            caption = json.loads(meta["json"])["caption"]
            assert caption.startswith("a handwritten digit ") and caption.rstrip(".").split()[-1] in DIGIT_WORDS
            assert torch.equal(tokens, tokenize([caption], context_length=16)[0])
    webp = build_train_loader(DataConfig(train_urls=str(IMG2DATASET / "webp" / "00000.tar"), local_batch=7), image_size=32,
                              context_length=16, rank=0, world_size=1, seed=0, epoch=0)
    assert [b.images.shape[0] for b in webp] == [7] and webp.skipped == {}


# ---------------------------------------------------------------------------------------------
# Sample counts without reading the shards


def write_counted_layouts(root: Path) -> None:
    """One set of 3 shards × 5 samples per layout: clipdist's index, OpenCLIP's sizes.json and
    __len__, no count file at all, and an index kept elsewhere."""
    for layout in ("index", "sizes", "len", "none", "explicit"):
        write_shard_set(str(root / layout), "train", 3, 5)
    (root / "sizes" / "train-index.json").unlink()
    (root / "sizes" / "sizes.json").write_text(json.dumps({f"train-{i:06d}.tar": 5 for i in range(3)}))
    (root / "len" / "train-index.json").unlink()
    (root / "len" / "__len__").write_text("15\n")
    (root / "none" / "train-index.json").unlink()
    shutil.move(root / "explicit" / "train-index.json", root / "elsewhere-index.json")


@pytest.mark.parametrize("opener", ["http", "pipe:curl"])
def test_counts_come_from_the_files_beside_the_shards(tmp_path, opener):
    """Reference: the 5 samples written per shard, and the server's log: no shard is fetched to
    count it while an index, sizes.json or __len__ exists (the small files are fetched through
    the shard's own opener, for pipe: by swapping the name inside the command)."""
    write_counted_layouts(tmp_path)
    with ShardServer(tmp_path) as server:
        def pattern(layout: str) -> str:
            url = server.url(f"{layout}/train-{{000000..000002}}.tar")
            return url if opener == "http" else f"pipe:curl -s -f {url}"

        assert counts(pattern("index")) == [5, 5, 5]
        assert counts(pattern("sizes")) == [5, 5, 5]
        assert not server.gets(".tar"), "nothing read to count"
        assert [r.path for r in server.gets()].count("/index/train-index.json") == 1

        # __len__ gives a total only: resampled mode shares it equally; exact mode counts instead.
        len_cfg = DataConfig(train_urls=pattern("len"), mode="resampled", samples_per_epoch=30, local_batch=5)
        assert len(loader_rows(len_cfg)) == 30 and len(server.gets(".tar")) > 0
        server.requests.clear()
        explicit = DataConfig(train_urls=pattern("explicit"), train_index=server.url("elsewhere-index.json"), local_batch=5)
        assert sorted(i for i, _ in loader_rows(explicit)) == list(range(15))
        assert sum(r.path.endswith("/elsewhere-index.json") for r in server.gets()) == 1
        assert sorted(r.path for r in server.gets(".tar")) == [f"/explicit/train-00000{i}.tar" for i in range(3)], "each once"

        server.requests.clear()
        assert counts(pattern("none")) == [5, 5, 5]  # read, as nothing else gives the counts
        assert sorted(r.path for r in server.gets(".tar")) == [f"/none/train-00000{i}.tar" for i in range(3)]


def test_samples_total_is_shared_in_resampled_mode(tmp_path):
    """data.train_samples (OpenCLIP's --train-num-samples habit): no shard is read to count;
    every shard counts 15 / 3 = 5, as written."""
    write_counted_layouts(tmp_path)
    cfg = DataConfig(train_urls=str(tmp_path / "none" / "train-{000000..000002}.tar"), mode="resampled", train_samples=15,
                     samples_per_epoch=20, local_batch=5)
    with ShardServer(tmp_path) as server:
        cfg.train_urls = server.url("none/train-{000000..000002}.tar")
        rows = loader_rows(cfg)
    assert len(rows) == 20 and all(i == image for i, image in rows) and set(i for i, _ in rows) <= set(range(15))


def _count_once(rank: int, world_size: int, pattern: str, run_dir: str) -> dict:
    cfg = DataConfig(train_urls=pattern, local_batch=5, shuffle_buffer=5)
    first = TrainData(cfg, image_size=8, context_length=16, rank=rank, world_size=world_size, seed=0,
                      counts_file=Path(run_dir) / "shard_counts.json")
    torch.distributed.barrier()
    requeued = TrainData(cfg, image_size=8, context_length=16, rank=rank, world_size=world_size, seed=0,
                         counts_file=Path(run_dir) / "shard_counts.json")
    return {"first": [len(g) for g in first.shards], "totals": [sum(s.samples for s in g) for g in requeued.shards]}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_counting_is_done_once_by_rank_zero_and_kept_for_a_requeue(tmp_path):
    """No count file beside 4 remote shards of 5: rank 0 reads each shard once (of 2 ranks), the
    counts go to the run's shard_counts.json, and a second launch (a requeue) reads none to count."""
    write_shard_set(str(tmp_path), "train", 4, 5)
    (tmp_path / "train-index.json").unlink()
    with ShardServer(tmp_path) as server:
        ranks = run_distributed(_count_once, world_size=2, args=(server.url("train-{000000..000003}.tar"), str(tmp_path / "run")))
        gets = Counter(r.path for r in server.gets(".tar"))
    assert [r["totals"] for r in ranks] == [[20], [20]]
    # 4 counting reads, and 1 per launch for the readability check (the epoch's first shard).
    assert sum(gets.values()) == 4 + 2 and set(gets.values()) <= {1, 2, 3}
    cached = json.loads((tmp_path / "run" / "shard_counts.json").read_text())["shards"]
    assert sorted(cached.values()) == [5, 5, 5, 5] and all(u.startswith(server.base) for u in cached)


# ---------------------------------------------------------------------------------------------
# Remote faults: retried, then counted


def _remote_epoch(rank: int, world_size: int, patterns: dict) -> dict:
    out = {}
    for name, (pattern, retries) in patterns.items():
        cfg = DataConfig(train_urls=pattern, local_batch=4, num_workers=2, shuffle_buffer=16, retries=retries)
        data = TrainData(cfg, image_size=8, context_length=16, rank=rank, world_size=world_size, seed=0)
        data_iter = iter(data)
        batches = [next(data_iter) for _ in range(len(data.build_loader(0, 0)))]
        out[name] = {"keys": [key_index(k) for b in batches for k in b.keys],
                     "rows_match": all(key_index(k) == decoded_index(im) for b in batches for k, im in zip(b.keys, b.images)),
                     "metrics": data.global_metrics(all_reduce_sum)}
    return out


def withheld(server: ShardServer, shard_dir: Path) -> Counter:
    """Samples the server's cut transfers did not deliver in full, by the reason a reader counts
    them under; the first shard request (rank 0's readability check, 16 samples at most) aside."""
    lost: Counter = Counter()
    for request in server.gets(".tar")[1:]:
        if request.cut_at is not None:
            path = shard_dir / request.path.lstrip("/")
            delivered = complete_samples_before(path, request.cut_at)
            lost["missing_shard" if delivered == 0 else "truncated_shard"] += 4 - delivered
    return lost


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_remote_faults_are_retried_then_counted_exactly(tmp_path):
    """16 shards of 4 on a real HTTP server that answers 404 for one shard and cuts every 5th
    shard transfer at half its bytes. 2 ranks × 2 loader workers × 8 steps of 4 = 64 positions:
    each stream reads whole shards. With data.retries=3 every cut is retried and read on: all 60
    samples of the 15 served shards are trained, and the 404 shard counts as 4 missing. With
    data.retries=0 the samples that each cut transfer withheld (from the server's log and the
    tars' member offsets) are counted, no more and no less."""
    write_shard_set(str(tmp_path), "train", 16, 4)
    lost_shard = "train-000007.tar"
    with ShardServer(tmp_path, missing=(lost_shard,), cut_every=5) as retried, \
         ShardServer(tmp_path, missing=(lost_shard,), cut_every=5) as not_retried:
        patterns = {"retried": (retried.url("train-{000000..000015}.tar"), 3),
                    "not_retried": (not_retried.url("train-{000000..000015}.tar"), 0)}
        ranks = run_distributed(_remote_epoch, world_size=2, args=(patterns,), timeout=280)
        expected_lost = withheld(not_retried, tmp_path)
        retried_cuts = [r for r in retried.gets(".tar") if r.cut_at is not None]
    served = set(range(64)) - set(range(28, 32))  # shard 7 holds samples 28-31

    runs = {name: [r[name] for r in ranks] for name in patterns}
    for name, per_rank in runs.items():
        assert all(r["rows_match"] for r in per_rank) and per_rank[0]["metrics"] == per_rank[1]["metrics"]
        trained = [i for r in per_rank for i in r["keys"]]
        metrics = per_rank[0]["metrics"]
        counted = {k.split("/")[-1]: int(v) for k, v in metrics.items() if k.startswith("data/skipped/") and v}
        assert len(trained) == 64 and metrics["data/rows"] == 64
        replaced = counted.get("missing_shard", 0) + counted.get("truncated_shard", 0)
        assert counted.get("padded", 0) == replaced == len(trained) - len(set(trained)), name
        assert len(set(trained)) + replaced == 64, f"{name}: every sample trained or counted"
    assert retried_cuts, "the server cut transfers"
    assert set(runs["retried"][0]["keys"] + runs["retried"][1]["keys"]) == served
    retried_counts = {k: v for k, v in runs["retried"][0]["metrics"].items() if k.startswith("data/skipped/") and v}
    assert retried_counts == {"data/skipped/missing_shard": 4, "data/skipped/padded": 4}
    assert sum(expected_lost.values()) > 0
    not_retried_counts = Counter({k.split("/")[-1]: int(v) for k, v in runs["not_retried"][0]["metrics"].items()
                                  if k in ("data/skipped/missing_shard", "data/skipped/truncated_shard") and v})
    assert not_retried_counts == expected_lost + Counter({"missing_shard": 4}), "counted = withheld"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_over_a_faulty_server_completes_and_counts_what_it_withheld(tmp_path, digits):
    """The same server faults under real training: torchrun, 2 ranks × 2 loader workers, one
    epoch (8 steps of 4 per rank), data.retries=0. Training completes; summary.json counts exactly
    what the server withheld (404 shard + what each cut transfer did not deliver whole), and the
    recorded keys (data.record_keys) hold every other sample: every sample trained or counted."""
    shard_dir = tmp_path / "shards"
    write_shard_set(str(shard_dir), "train", 16, 4)
    with ShardServer(shard_dir, missing=("train-000007.tar",), cut_every=5) as server:
        torchrun(tmp_path / "run", digits, f"data.train_urls='{server.url('train-{000000..000015}.tar')}'", "data.local_batch=4",
                 "data.num_workers=2", "data.shuffle_buffer=16", "data.retries=0", "data.record_keys=true", "train.max_steps=8",
                 "data.generate_digits=false", *QUIET_EVAL)
        lost = withheld(server, shard_dir) + Counter({"missing_shard": 4})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counted = {k.split("/")[-1]: int(v) for k, v in summary["data"].items() if k.split("/")[-1] in lost and v}
    assert lost["truncated_shard"] > 0, "the server cut transfers that training needed"
    assert summary["steps"] == 8 and counted == dict(lost), (counted, lost)
    trained = set()
    for keys in (tmp_path / "run" / "keys").glob("rank*.txt"):
        trained.update(key_index(k) for line in keys.read_text().splitlines() for k in line.split()[2:])
    assert len(trained) + sum(lost.values()) == 64 and 28 not in trained


# ---------------------------------------------------------------------------------------------
# Cut tars, stale and broken indexes


def test_a_tar_cut_at_a_member_boundary_is_detected_without_an_index(tmp_path, caplog):
    """Python's tarfile reads a tar cut at a member boundary as a normal end. Reference: the 12
    samples left before the cut of a 20-sample shard; the shard is named in the log and counted."""
    write_shard_set(str(tmp_path), "train", 2, 20)
    (tmp_path / "train-index.json").unlink()
    cut = tmp_path / "train-000001.tar"
    truncate_after(str(cut), 12)
    read = []
    with pytest.raises(TruncatedArchive):
        for sample in iter_shard(str(cut)):
            read.append(sample["__key__"])
    assert read == [f"{i:09d}" for i in range(20, 32)], "every complete sample first, then the error"
    caplog.set_level(logging.WARNING)
    cfg = DataConfig(train_urls=str(tmp_path / "train-{000000..000001}.tar"), local_batch=4)
    data = TrainData(cfg, image_size=8, context_length=16, rank=0, world_size=1, seed=0)
    assert [s.samples for s in data.shards[0]] == [20, 12]
    assert data.global_metrics(all_reduce_sum)["data/counting/truncated_shard"] == 1
    assert any("train-000001.tar" in r.message and "truncated_shard" in r.message for r in caplog.records)


def test_a_stale_index_is_counted_not_trusted(tmp_path, caplog):
    """An index that understates a shard (5 listed, 8 in the tar): the 5 are trained, the 3 more
    are read past, counted as data/skipped/unindexed, and the log says the index is stale."""
    write_shard_set(str(tmp_path), "train", 2, 8)
    index = json.loads((tmp_path / "train-index.json").read_text())
    index["shards"][1]["samples"] = 5
    (tmp_path / "train-index.json").write_text(json.dumps(index))
    caplog.set_level(logging.WARNING)
    cfg = DataConfig(train_urls=str(tmp_path / "train-{000000..000001}.tar"), local_batch=13, shuffle_buffer=13)
    loader = build_train_loader(cfg, image_size=8, context_length=16, rank=0, world_size=1, seed=0, epoch=0)
    (batch,) = list(loader)
    assert sorted(key_index(k) for k in batch.keys) == list(range(13))
    assert loader.skipped == {"unindexed": 3}
    assert any("index is stale" in r.message and "train-000001.tar" in r.message for r in caplog.records)


def test_broken_indexes_are_one_line_errors_naming_the_file(tmp_path):
    write_shard_set(str(tmp_path), "train", 2, 4)
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    (tmp_path / "other-index.json").write_text(json.dumps({"shards": [{"url": "nope-000000.tar", "samples": 3}]}))
    cases = {
        "not JSON": ("train-index.json", "{ this is not json", None),
        "stray shard": (None, None, str(tmp_path / "other-index.json")),
    }
    for name, (file, text, explicit) in cases.items():
        if file:
            (tmp_path / file).write_text(text)
        cfg = DataConfig(train_urls=pattern, train_index=explicit, local_batch=2)
        with pytest.raises(DataError) as error:
            TrainData(cfg, image_size=8, context_length=16, rank=0, world_size=1, seed=0)
        message = str(error.value)
        assert "\n" not in message, name
        if name == "not JSON":
            assert message.startswith(str(tmp_path / "train-index.json")) and "not JSON" in message
        else:
            assert str(tmp_path / "other-index.json") in message and "nope-000000.tar" in message
        write_shard_set(str(tmp_path), "train", 2, 4)  # a good index again


# ---------------------------------------------------------------------------------------------
# python -m clipdist.data.index


@pytest.mark.timeout(120)
def test_index_cli_counts_in_parallel_and_resumes_after_a_kill(tmp_path):
    """6 remote shards of 3-8 samples on a slow server (0.3 s a shard), one at a time: the CLI is
    SIGKILLed after 2 counts are on disk; the rerun reads only the other 4 and writes the index
    that an uninterrupted run writes. Reference: the sizes written."""
    sizes = [3, 8, 5, 4, 7, 6]
    for i, size in enumerate(sizes):
        write_shard_set(str(tmp_path / "tmp"), f"p{i}", 1, size)
        shutil.move(tmp_path / "tmp" / f"p{i}-000000.tar", tmp_path / f"{i:05d}.tar")
    out = tmp_path / "out" / "shards-index.json"
    out.parent.mkdir()
    with ShardServer(tmp_path, tar_delay_s=0.3) as server:
        command = [sys.executable, "-m", "clipdist.data.index", server.url("{00000..00005}.tar"), "--out", str(out), "--workers", "1"]
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        progress = out.parent / ".shards-index.json.partial"
        deadline = time.monotonic() + 60
        while not (progress.exists() and len(progress.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert first.returncode == -signal.SIGKILL and not out.exists(), "killed before it finished"
        done_before = [json.loads(line)["url"] for line in progress.read_text().splitlines()]
        gets_before = len(server.gets(".tar"))
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stdout + second.stderr
        later = [r.path.lstrip("/") for r in server.gets(".tar")[gets_before:]]
    assert 2 <= len(done_before) < 6
    assert sorted(later) == sorted({f"{i:05d}.tar" for i in range(6)} - {u.rsplit("/", 1)[1] for u in done_before})
    index = json.loads(out.read_text())
    assert index == {"shards": [{"url": f"{i:05d}.tar", "samples": n} for i, n in enumerate(sizes)], "total": sum(sizes)}
    assert not progress.exists()


# ---------------------------------------------------------------------------------------------
# 100,000 shard URLs: what is fetched before the first step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_first_step_over_100k_remote_shards_fetches_only_what_it_needs(tmp_path, digits):
    """2 ranks train one step over 100,000 shard URLs behind a real HTTP server, with one index
    file (each URL is one of the 4 digits shards under another name). Reference: the server's
    log. Before and during step 1 it serves the index once and, of the 100,000 shards, only those
    holding the ranks' first shuffle windows (and rank 0's readability check of the first)."""
    real = sorted(p.name for p in digits.glob("train-*.tar"))
    sizes = {s["url"]: s["samples"] for s in json.loads((digits / "train-index.json").read_text())["shards"]}
    n = 100_000
    names = [f"big-{i:06d}.tar" for i in range(n)]
    counts_list = [sizes[real[i % 4]] for i in range(n)]
    (tmp_path / "big-index.json").write_text(json.dumps({"shards": [{"url": u, "samples": c} for u, c in zip(names, counts_list)]}))
    for name in real:
        shutil.copy(digits / name, tmp_path / name)
    alias = lambda name: real[int(name[4:10]) % 4] if name.startswith("big-") and name.endswith(".tar") else None  # noqa: E731
    with ShardServer(tmp_path, alias=alias) as server:
        run_dir = tmp_path / "run"
        torchrun(run_dir, digits, f"data.train_urls='{server.url('big-{000000..099999}.tar')}'", "train.max_steps=1",
                 "data.num_workers=0", "train.checkpoint_every=0", *QUIET_EVAL)
        requests = server.gets()
    assert [r.path for r in requests if not r.path.endswith(".tar")] == ["/big-index.json"], "one index GET, no probes"
    # The ranks' first windows: exact mode, epoch 0's shard order; rank r starts at r × steps × 16.
    order = np.random.default_rng([0, 0]).permutation(n)
    starts = np.cumsum([0] + [counts_list[i] for i in order])
    steps = int(starts[-1]) // (16 * 2)
    needed = set()
    for first in (0, steps * 16):
        window = range(first, first + 256)  # the tiny recipe's shuffle buffer
        lo, hi = np.searchsorted(starts, window[0], "right") - 1, np.searchsorted(starts, window[-1], "right") - 1
        needed.update(names[order[j]] for j in range(lo, hi + 1))
    fetched = [r.path.lstrip("/") for r in requests if r.path.endswith(".tar")]
    assert set(fetched) <= needed and len(fetched) <= len(needed) + 1, (fetched, needed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["data"]["data/rows"] == 32


def broken_index(folder: Path) -> tuple[str, str]:
    """Shards named as the digits set's are, beside an index that is not JSON."""
    write_shard_set(str(folder), "train", 2, 4)
    (folder / "train-index.json").write_text("{ not json")
    return "train-{000000..000001}.tar", f"{folder}/train-index.json: the index is not JSON"


def garbage_tar(folder: Path) -> tuple[str, str]:
    (folder / "x.tar").write_bytes(b"this is not a tar archive " * 40)
    return "x.tar", f"data.train_urls ({folder}/x.tar): unreadable: {folder}/x.tar: ReadError: invalid header"


def directory_named_tar(folder: Path) -> tuple[str, str]:
    (folder / "x.tar").mkdir()
    return "x.tar", f"data.train_urls ({folder}/x.tar): unreadable: {folder}/x.tar: IsADirectoryError: "


def empty_tar(folder: Path) -> tuple[str, str]:
    """No members, and the two zero blocks that end an archive (once misread as a cut file)."""
    tarfile.open(folder / "x.tar", "w").close()
    return "x.tar", f"data.train_urls ({folder}/x.tar): unreadable: {folder}/x.tar: has no samples"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("make_source", [broken_index, garbage_tar, directory_named_tar, empty_tar])
def test_unusable_data_stops_the_entry_point_with_one_line(tmp_path, make_source):
    """`python -m clipdist.train` on a source that cannot be used: exit status 2 and one line
    naming the file, no traceback, before the engine is built. The data group is the digits one,
    which writes the digits shards where a source names them: never beside the user's own files."""
    folder = tmp_path / "shards"
    folder.mkdir()
    pattern, says = make_source(folder)
    before = sorted(path.name for path in folder.iterdir())
    result = entry_point("clipdist.train", "+experiment=tiny", f"data.train_urls='{folder / pattern}'",
                         f"train.output_dir={tmp_path / 'run'}", *QUIET_EVAL)
    line = one_line_error(result, "data error")
    assert line.startswith(f"clipdist: data error: {says}"), line
    assert "parameters, global batch" not in result.stdout, "stopped before the engine was built"
    assert sorted(path.name for path in folder.iterdir()) == before, "written into the user's folder"
