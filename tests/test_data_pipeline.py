"""The production data pipeline on real shards and 2 real gloo ranks × 2 loader workers:
exactly-once epochs over uneven shards, weighted multi-source resampling, bad data skipped and
counted, and mid-epoch resume from a saved position in both modes.

Reference throughout: the keys written. Sample i has key i, an image coding i and caption i
(tests/shard_helpers.py), so every row of every batch is traced to what was written."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_distributed
from shard_helpers import caption_of, decoded_index, key_index, write_faulty_shards, write_indexed_shards

from clipdist.config import ConfigError, DataConfig, SourceConfig
from clipdist.data.epochs import TrainData
from clipdist.distributed import all_reduce_sum
from clipdist.models.tokenizer import tokenize

SIZES_A = [5, 11, 2, 9]  # keys 0..26, source "a"
SIZES_B = [7, 1, 13]  # keys 27..47, source "b": 7 shards, 48 samples in all
LOCAL_BATCH = 3  # × 2 ranks: 8 batches per rank per epoch, nothing dropped


def two_sources(shard_dir: str, weights: tuple[float, float] = (1.0, 1.0), **data) -> DataConfig:
    sources = [
        SourceConfig(urls=os.path.join(shard_dir, "a{0..3}-000000.tar"), weight=weights[0], name="a"),
        SourceConfig(urls=os.path.join(shard_dir, "b{0..2}-000000.tar"), weight=weights[1], name="b"),
    ]
    settings = dict(local_batch=LOCAL_BATCH, num_workers=2, shuffle_buffer=2 * LOCAL_BATCH)
    return DataConfig(train_urls=None, sources=sources, **{**settings, **data})


def write_two_sources(shard_dir: str) -> None:
    write_indexed_shards(shard_dir, "a", SIZES_A)
    write_indexed_shards(shard_dir, "b", SIZES_B, first=sum(SIZES_A))


def train_data(cfg: DataConfig, rank: int, world_size: int, seed: int = 0) -> TrainData:
    return TrainData(cfg, image_size=8, context_length=16, rank=rank, world_size=world_size, seed=seed)


def take(data_iter, n: int) -> list[list[int]]:
    """The next n batches as lists of sample indices, checking each row against its key."""
    batches = []
    for _ in range(n):
        batch = next(data_iter)
        indices = [key_index(k) for k in batch.keys]
        assert [decoded_index(image) for image in batch.images] == indices, "image rows do not match their keys"
        assert torch.equal(batch.tokens, tokenize([caption_of(i) for i in indices], context_length=16)), "captions"
        batches.append(indices)
    return batches


# ---------------------------------------------------------------------------------------------
# Exact and resampled epochs on 2 ranks × 2 workers


def _epochs(rank: int, world_size: int, shard_dir: str) -> dict:
    exact = train_data(two_sources(shard_dir), rank, world_size)
    exact_iter = iter(exact)
    first_epoch = take(exact_iter, 8)
    out = {
        "epoch0": first_epoch,
        "batches_per_epoch": len(exact.loader),
        "epoch1": take(exact_iter, 8),
        "epoch0_again": take(iter(train_data(two_sources(shard_dir), rank, world_size)), 8),
        "epoch0_seed1": take(iter(train_data(two_sources(shard_dir), rank, world_size, seed=1)), 8),
        "exact_metrics": exact.stats.global_metrics(all_reduce_sum),
    }
    resampled_cfg = two_sources(shard_dir, weights=(0.8, 0.2), mode="resampled", samples_per_epoch=720)
    resampled = train_data(resampled_cfg, rank, world_size)
    resampled_iter = iter(resampled)
    out["resampled"] = take(resampled_iter, 120)  # one epoch: 720 / (3 × 2)
    out["resampled_epoch1"] = take(resampled_iter, 4)
    out["resampled_again"] = take(iter(train_data(resampled_cfg, rank, world_size)), 10)
    out["resampled_seed1"] = take(iter(train_data(resampled_cfg, rank, world_size, seed=1)), 10)
    out["resampled_metrics"] = resampled.stats.global_metrics(all_reduce_sum)
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_exact_and_resampled_epochs_on_two_ranks_two_workers(tmp_path):
    write_two_sources(str(tmp_path))
    ranks = run_distributed(_epochs, world_size=2, args=(str(tmp_path),), timeout=200)  # fails, not hangs

    # exact: 48 samples of 7 uneven shards in 2 sources, each seen exactly once per epoch.
    for epoch in ("epoch0", "epoch1", "epoch0_seed1"):
        seen = [i for r in ranks for batch in r[epoch] for i in batch]
        assert sorted(seen) == list(range(48)), f"{epoch}: not every sample exactly once"
    assert [r["batches_per_epoch"] for r in ranks] == [8, 8], "equal steps on every rank"
    for r in ranks:
        assert r["epoch0_again"] == r["epoch0"], "same seed, same stream"
        assert r["epoch0_seed1"] != r["epoch0"] and r["epoch1"] != r["epoch0"], "other seed or epoch, other stream"
    metrics = ranks[0]["exact_metrics"]
    assert metrics == ranks[1]["exact_metrics"] and metrics["data/rows"] == 96  # 2 epochs × 48
    assert metrics["data/mix/a"] == pytest.approx(27 / 48) and metrics["data/mix/b"] == pytest.approx(21 / 48)

    # resampled: with replacement, so samples repeat; deterministic by seed; mix follows the weights.
    for r in ranks:
        assert r["resampled_again"] == r["resampled"][:10]
        assert r["resampled_seed1"] != r["resampled"][:10]
        assert r["resampled_epoch1"] != r["resampled"][:4], "a new epoch draws anew"
    seen = Counter(i for r in ranks for batch in r["resampled"] for i in batch)
    assert sum(seen.values()) == 720 and set(seen) <= set(range(48))
    share_a = sum(n for i, n in seen.items() if i < 27) / 720
    mix = ranks[0]["resampled_metrics"]
    assert mix["data/rows"] == 720 + 4 * 3 * 2
    # Whole shards are drawn (5 samples on average), so 720 samples are ~140 draws: the share of
    # "a" has a standard deviation of ~0.035 around 0.8; 0.12 is > 3 of them.
    assert abs(share_a - 0.8) < 0.12, share_a
    assert abs(mix["data/mix/a"] - 0.8) < 0.12 and mix["data/mix/a"] + mix["data/mix/b"] == pytest.approx(1)


# ---------------------------------------------------------------------------------------------
# Bad data


def _faulty_epoch(rank: int, world_size: int, shard_dir: str) -> dict:
    cfg = DataConfig(train_urls=os.path.join(shard_dir, "f{0..5}-000000.tar"), local_batch=4, num_workers=2, shuffle_buffer=8)
    data = train_data(cfg, rank, world_size)
    data_iter = iter(data)
    batches = [[key_index(k) for k in next(data_iter).keys] for _ in range(15)]
    return {"batches": batches, "per_epoch": len(data.loader), "metrics": data.stats.global_metrics(all_reduce_sum)}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bad_samples_truncated_and_missing_shards_are_skipped_and_counted(tmp_path):
    """120 positions = 15 batches of 4 on each of 2 ranks. Injected: 10 % bad samples of six kinds,
    a tar truncated after 12 of its 20 samples, a shard file missing. The epoch completes on both
    ranks; every good sample is trained; the counts equal what was injected, and the duplicates
    that took the bad rows' places equal their number."""
    truth = write_faulty_shards(str(tmp_path))
    ranks = run_distributed(_faulty_epoch, world_size=2, args=(str(tmp_path),), timeout=200)
    assert [r["per_epoch"] for r in ranks] == [15, 15]
    rows = [i for r in ranks for batch in r["batches"] for i in batch]
    assert set(rows) == set(truth["good"]), "every good sample trained, no bad one"
    metrics = ranks[0]["metrics"]
    counted = {k.split("/")[-1]: int(v) for k, v in metrics.items() if k.startswith("data/skipped/") and v}
    bad_positions = 120 - len(truth["good"])
    assert counted == {**truth["injected"], "padded": bad_positions}, counted
    assert len(rows) - len(set(rows)) == bad_positions, "each bad position padded by one duplicate"


def test_a_source_that_cannot_be_read_is_one_clear_error(tmp_path):
    write_indexed_shards(str(tmp_path), "ok", [4])
    for i in range(2):
        (tmp_path / f"junk{i}.tar").write_bytes(b"this is not a tar archive " * 40)
    cfg = DataConfig(
        train_urls=None,
        sources=[SourceConfig(str(tmp_path / "ok0-000000.tar")), SourceConfig(str(tmp_path / "junk{0..1}.tar"))],
        local_batch=2,
    )
    with pytest.raises(ValueError) as error:
        train_data(cfg, 0, 1)
    message = str(error.value)
    assert message.startswith("data.sources[1] (") and "junk0.tar" in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------
# Mid-epoch resume from a saved position


def _resume(rank: int, world_size: int, shard_dir: str, mode: str) -> dict:
    extra = {"mode": mode, "samples_per_epoch": 60} if mode == "resampled" else {}
    cfg = two_sources(shard_dir, **extra)
    uninterrupted = take(iter(train_data(cfg, rank, world_size)), 20)  # crosses epoch boundaries

    interrupted = train_data(cfg, rank, world_size)
    interrupted_iter = iter(interrupted)
    before = take(interrupted_iter, 5)
    saved = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
    resumed = train_data(cfg, rank, world_size)
    resumed.load_state_dict(saved)
    after = take(iter(resumed), 15)

    # data.num_workers may change: the rest of the epoch is read as it was planned (3 batches).
    other = train_data(two_sources(shard_dir, num_workers=1, **extra), rank, world_size)
    other.load_state_dict(saved)
    return {"uninterrupted": uninterrupted, "before": before, "after": after, "saved": saved, "one_worker": take(iter(other), 3)}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_resume_from_a_saved_position_continues_the_same_stream(tmp_path, mode):
    """Interrupted after 5 of 8 (exact) or 10 (resampled) batches of the first epoch, then resumed
    from the saved position: the next 15 batches, across epoch ends, equal the uninterrupted run's."""
    write_two_sources(str(tmp_path))
    ranks = run_distributed(_resume, world_size=2, args=(str(tmp_path), mode), timeout=200)
    for r in ranks:
        assert r["before"] + r["after"] == r["uninterrupted"], "no repeats, no gaps"
        assert r["saved"]["epoch"] == 0 and r["saved"]["next_batch"] == 5 and len(r["saved"]["streams"]) == 2
        assert all(s["shard"] and s["sample_offset"] >= 0 for s in r["saved"]["streams"])
        assert r["one_worker"] == r["after"][:3], "the planned rest of the epoch, with one loader worker instead of two"


# ---------------------------------------------------------------------------------------------
# A checkpoint after every step of an epoch


def _every_resume_point(rank: int, world_size: int, shard_dir: str, keys_dir: str) -> dict:
    """For each mode and data.num_workers 0-3: the keys recorded (data.record_keys) by an
    uninterrupted epoch + 1 batch, and by launch pairs interrupted after each step k and resumed
    from the saved position, both launches recording into one file."""
    out = {}
    for mode in ("exact", "resampled"):
        for workers in (0, 1, 3):  # 3 covers 2: its streams end one and two steps before the epoch
            extra = {"mode": mode, "samples_per_epoch": 48} if mode == "resampled" else {}
            cfg = two_sources(shard_dir, local_batch=4, num_workers=workers, shuffle_buffer=8, **extra)
            name = f"{keys_dir}/{mode}-w{workers}"

            def launch(keys_file: str) -> TrainData:
                return TrainData(cfg, image_size=8, context_length=16, rank=rank, world_size=world_size, seed=0,
                                 keys_file=Path(keys_file))

            reference = launch(f"{name}-reference-rank{rank}.txt")
            take(iter(reference), 7)  # the epoch's 6 batches and the next epoch's first
            steps = len(reference.loader)
            for k in range(1, steps + 1):
                keys_file = f"{name}-k{k}-rank{rank}.txt"
                first = launch(keys_file)
                take(iter(first), k)
                saved = json.loads(json.dumps(first.state_dict()))  # the crash of issue 13 was here
                second = launch(keys_file)
                second.load_state_dict(saved)
                take(iter(second), steps + 1 - k)
            out[f"{mode}-w{workers}"] = steps
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_checkpoint_after_any_step_resumes_exactly(tmp_path):
    """48 samples, local batch 4 × 2 ranks: 6 steps an epoch. With W loader workers a stream is
    done up to W - 1 steps before the epoch ends; a checkpoint there used to crash
    (describe_stream). Reference: the uninterrupted launch's recorded keys (data.record_keys):
    the two launches around each of the 6 resume points record exactly the same lines, in both
    modes, for data.num_workers 0, 1 and 3: nothing repeated, nothing skipped."""
    shard_dir, keys_dir = tmp_path / "shards", tmp_path / "keys"
    shard_dir.mkdir()
    keys_dir.mkdir()
    write_two_sources(str(shard_dir))
    ranks = run_distributed(_every_resume_point, world_size=2, args=(str(shard_dir), str(keys_dir)), timeout=380)
    assert all(steps == 6 for r in ranks for steps in r.values()) and len(ranks[0]) == 6
    for reference in sorted(keys_dir.glob("*-reference-rank*.txt")):
        expected = reference.read_text().splitlines()
        assert len(expected) == 7
        for k in range(1, 7):
            resumed = reference.with_name(reference.name.replace("-reference-", f"-k{k}-"))
            assert resumed.read_text().splitlines() == expected, f"{resumed.name}: resumed after step {k}"


# ---------------------------------------------------------------------------------------------
# Elastic resume: the rest of an epoch on another world size


def global_batches(cfg: DataConfig, world_size: int, accum_steps: int, steps: int, position: dict | None = None, epoch: int = 0) -> list[list[int]]:
    """Each step's global batch (sorted sample indices over all ranks and micro-batches), the
    ranks read one after the other in this process, from ``position`` (or ``epoch``'s start)."""
    per_rank = []
    for rank in range(world_size):
        data = TrainData(cfg, image_size=8, context_length=16, rank=rank, world_size=world_size, seed=0, accum_steps=accum_steps)
        data.epoch = epoch
        if position is not None:
            data.load_state_dict(position)
        per_rank.append(take(iter(data), steps * accum_steps))
    return [sorted(i for batches in per_rank for batch in batches[s * accum_steps : (s + 1) * accum_steps] for i in batch) for s in range(steps)]


@pytest.mark.parametrize("world_size, accum_steps, workers", [(3, 4, 0), (2, 6, 1), (1, 12, 2)], ids=["4to3", "4to2", "4to1"])
def test_elastic_resume_trains_the_planned_global_batches_then_ordinary_epochs(tmp_path, world_size, accum_steps, workers):
    """Planned for 4 ranks × 3 micro-batches of 1 sample × 2 loader workers (global batch 12, 4
    steps per epoch over 48 samples) and stopped after step 1: relaunched on 3, 2 or 1 rank(s)
    with the accumulation that keeps the global batch, and other loader workers, each of steps
    2-4 trains exactly the planned global batch (so no sample is repeated or skipped), and the
    next epoch is an ordinary one of the new layout: every sample once."""
    write_two_sources(str(tmp_path))
    planned_cfg, cfg = two_sources(str(tmp_path), local_batch=1), two_sources(str(tmp_path), local_batch=1, num_workers=workers)
    planned = global_batches(planned_cfg, 4, 3, 4)
    interrupted = TrainData(planned_cfg, image_size=8, context_length=16, rank=0, world_size=4, seed=0, accum_steps=3)
    take(iter(interrupted), 3)  # step 1
    position = json.loads(json.dumps(interrupted.state_dict()))
    resumed = global_batches(cfg, world_size, accum_steps, 3 + 4, position)
    assert resumed[:3] == planned[1:], "the rest of the epoch: the planned global batches"
    next_epoch = sorted(i for batch in resumed[3:] for i in batch)
    assert next_epoch == list(range(sum(SIZES_A) + sum(SIZES_B))), "the next epoch: every sample once"
    assert resumed[3:] != global_batches(planned_cfg, 4, 3, 8)[4:], "the next epoch is planned for the new layout"


def test_elastic_resume_in_resampled_mode_continues_the_planned_streams(tmp_path):
    """data.mode=resampled draws shards with replacement from seeded per-rank, per-worker streams.
    Planned for 4 ranks × 3 micro-batches and stopped after step 1, relaunched on 2 ranks × 6:
    the rest of the epoch draws exactly the planned global batches (the planned streams, read
    on), and the next epoch is the one a run launched on 2 ranks from the start draws."""
    write_two_sources(str(tmp_path))
    cfg = two_sources(str(tmp_path), local_batch=1, mode="resampled", samples_per_epoch=48)
    planned = global_batches(cfg, 4, 3, 4)
    interrupted = TrainData(cfg, image_size=8, context_length=16, rank=0, world_size=4, seed=0, accum_steps=3)
    take(iter(interrupted), 3)  # step 1
    position = json.loads(json.dumps(interrupted.state_dict()))
    resumed = global_batches(cfg, 2, 6, 3 + 4, position)
    assert resumed[:3] == planned[1:], "the rest of the epoch: the planned global batches"
    assert resumed[3:] == global_batches(cfg, 2, 6, 4, epoch=1), "the next epoch: the 2-rank layout's own"
    assert resumed[3:] != global_batches(cfg, 4, 3, 8)[4:]


def test_elastic_resume_refuses_another_local_or_global_batch_unless_inexact(tmp_path):
    """Another local or global batch cannot train the planned global batches: one line naming the
    change and the override; with train.resume_inexact the run goes on at the next epoch."""
    write_two_sources(str(tmp_path))
    cfg = two_sources(str(tmp_path), local_batch=1)
    interrupted = TrainData(cfg, image_size=8, context_length=16, rank=0, world_size=4, seed=0, accum_steps=3)
    take(iter(interrupted), 3)
    saved = json.loads(json.dumps(interrupted.state_dict()))
    for world_size, accum_steps, local_batch, says in [(3, 3, 1, "global_batch 12 → 9"), (2, 3, 2, "local_batch 1 → 2")]:
        other_cfg = two_sources(str(tmp_path), local_batch=local_batch)
        other = TrainData(other_cfg, image_size=8, context_length=16, rank=0, world_size=world_size, seed=0, accum_steps=accum_steps)
        with pytest.raises(ConfigError) as info:
            other.load_state_dict(saved)
        assert says in str(info.value) and "train.resume_inexact=true" in str(info.value) and "\n" not in str(info.value)
        inexact = TrainData(other_cfg, image_size=8, context_length=16, rank=0, world_size=world_size, seed=0, accum_steps=accum_steps, resume_inexact=True)
        inexact.load_state_dict(saved)
        fresh = TrainData(other_cfg, image_size=8, context_length=16, rank=0, world_size=world_size, seed=0, accum_steps=accum_steps)
        fresh.epoch = 1
        assert (inexact.epoch, inexact.next_batch) == (1, 0) and take(iter(inexact), 2) == take(iter(fresh), 2), "the next epoch, from its start"
