"""Preemption, dead and hung ranks, NaN losses and kills mid-checkpoint, on real runs of
clipdist.train (2 gloo ranks, DeepSpeed, digits shards). The Slurm side is tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipdist.engine.checkpoint import Checkpointer, prune_checkpoints
from clipdist.faults import PEER_FAULT_EXIT, StopSignals, requeue_slurm_job
from conftest import QUIET_EVAL, RankProcesses, losses, torchrun, torchrun_result, train_overrides, wait_for_step

INJECT = str(Path(__file__).with_name("inject.py"))


def test_stop_signal_sets_a_flag_that_all_ranks_agree_on():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert stop.agreed(torch.device("cpu")) == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not change the reason
        assert stop.received == "SIGUSR1" and stop.agreed(torch.device("cpu")) == 1
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_requeue_is_a_no_op_outside_slurm():
    assert requeue_slurm_job({}) is None


def test_resume_auto_starts_fresh_without_a_checkpoint_and_latest_insists(tmp_path):
    checkpointer = Checkpointer(tmp_path, rank=0)
    assert checkpointer.resolve("auto") is None and checkpointer.resolve(None) is None
    with pytest.raises(FileNotFoundError, match="train.resume=latest: no checkpoint"):
        checkpointer.resolve("latest")
    (tmp_path / "latest").write_text("step_00000007")
    with pytest.raises(FileNotFoundError, match="names step_00000007, which does not exist"):
        checkpointer.resolve("auto")


def test_pruning_keeps_the_newest_complete_checkpoints_and_the_latest(tmp_path):
    for name in ("step_00000002", "step_00000004", "step_00000005", "step_00000005.1", "step_00000006.partial"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step_00000005.1")
    assert prune_checkpoints(tmp_path, keep=0) == []
    assert prune_checkpoints(tmp_path, keep=2) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000005", "step_00000005.1", "step_00000006.partial"]
    (tmp_path / "latest").write_text("step_00000005")  # never the checkpoint `latest` names
    assert prune_checkpoints(tmp_path, keep=1) == []


def keys_per_step(run_dir: Path, rank: int) -> list[str]:
    return (run_dir / "keys" / f"rank{rank:05d}.txt").read_text().splitlines()


@pytest.mark.slow
def test_sigusr1_on_one_rank_checkpoints_and_the_restart_continues_exactly(tmp_path, digits):
    """SIGUSR1 to rank 1 alone: both ranks stop after the same step k, checkpoint and exit 0. The
    restart (train.resume=auto) trains the next 20 steps with the uninterrupted run's losses
    (≤ 1e-6), and over the whole epoch (46 steps) every sample is trained exactly once."""
    common = [*QUIET_EVAL, "train.max_steps=46", "data.record_keys=true", "logging.log_every=1"]
    full_dir, run_dir = tmp_path / "full", tmp_path / "preempted"
    full = losses(torchrun(full_dir, digits, *common))

    ranks = RankProcesses(train_overrides(run_dir, digits, *common, "train.resume=auto"), tmp_path / "logs1")
    try:
        wait_for_step(run_dir, 5, ranks)
        ranks.processes[1].send_signal(signal.SIGUSR1)
        assert ranks.wait(timeout=120) == [0, 0], ranks.output(0)[-3000:]
    finally:
        ranks.kill()
    k = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 5 <= k <= 26, f"stopped at step {k}: too late to check 20 more steps"
    assert "stopping after step" in ranks.output(0) and "SIGUSR1 on this rank" in ranks.output(1)
    assert not (run_dir / "summary.json").exists(), "a preempted run is not finished"

    resumed = losses(torchrun(run_dir, digits, *common, "train.resume=auto"))
    for step in range(k + 1, k + 21):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])
    epoch_keys = set()
    for rank in (0, 1):
        lines = keys_per_step(run_dir, rank)
        assert lines == keys_per_step(full_dir, rank), f"rank {rank}: the batches differ from the uninterrupted run's"
        keys = [key for line in lines for key in line.split()[2:]]
        epoch_keys.update(keys)
        assert len(keys) == 46 * 16
    assert len(epoch_keys) == 2 * 46 * 16, "a sample was trained twice in the epoch"


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, digits):
    """The process SIGKILLs itself right after the first file of the step-4 checkpoint lands; the
    relaunch resumes from step 2, trains on and saves step 4 over the leftover partial write
    (keeping the newest two checkpoints).
    (That a resume reproduces the uninterrupted losses is the SIGUSR1 test's.)"""
    common = [*QUIET_EVAL, "train.max_steps=6", "train.checkpoint_every=2", "train.resume=auto", "train.keep_checkpoints=2"]
    run_dir = tmp_path / "run"
    killed = RankProcesses(train_overrides(run_dir, digits, *common), tmp_path / "logs", world_size=1, command=[INJECT, "kill-in-save", "step_00000004", "--"])
    assert killed.wait(timeout=240) == [-signal.SIGKILL], killed.output(0)[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert (checkpoints / "step_00000004.partial").is_dir() and not (checkpoints / "step_00000004").exists()

    resumed = RankProcesses(train_overrides(run_dir, digits, *common), tmp_path / "logs2", world_size=1)
    assert resumed.wait(timeout=240) == [0], resumed.output(0)[-3000:]
    assert "resumed from" in resumed.output(0) and "step_00000002 at step 2" in resumed.output(0)
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_00000004", "step_00000006"], "train.keep_checkpoints=2"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(losses(rows))[-4:] == [3, 4, 5, 6], "the relaunch trains steps 3-6 after the killed launch's 1-3"


@pytest.mark.slow
def test_nan_losses_are_skipped_and_counted_and_a_run_of_them_stops_with_a_checkpoint(tmp_path, digits):
    """Rank 0's loss is NaN at its calls 3 and 5 (rank 1's stays finite), then from call 8 on.
    Both ranks skip 3 and 5 (no update, counted) and train on; calls 8, 9, 10 are 3 in a row =
    train.max_bad_steps, so the run stops with exit 1, one line, and a checkpoint of the last good
    weights (step 5: calls 1, 2, 4, 6, 7), which a restart loads."""
    common = [*QUIET_EVAL, "train.max_steps=20", "train.max_bad_steps=3", "train.checkpoint_every=5"]
    result, rows = torchrun_result(tmp_path, digits, *common, script=[INJECT, "nan-loss", "0", "3,5,8-", "--"])
    assert result.returncode != 0
    assert "clipdist: train.max_bad_steps=3: 3 steps in a row had a NaN/inf loss (the last non-finite loss on rank(s) [0]); stopped after step 5" in result.stdout + result.stderr
    logged = losses(rows)
    assert sorted(logged) == [1, 2, 3, 4, 5] and all(map(lambda v: v == v, logged.values()))
    assert [row["train/nonfinite_steps"] for row in rows if "train/nonfinite_steps" in row] == [0, 0, 1, 2, 2]
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert latest == "step_00000005.1", "the stop saves the step-5 weights at a later data position, beside step 5's"
    state = torch.load(tmp_path / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)["train_state"]
    assert state["step"] == 5 and state["nonfinite_steps"] == 5 and state["step_in_epoch"] == 10

    resumed = torchrun(tmp_path, digits, *common, "train.max_steps=7", "train.resume=auto")
    assert sorted(losses(resumed))[-2:] == [6, 7]


def start_and_reach_step(tmp_path: Path, digits: Path, timeout_s: int) -> RankProcesses:
    overrides = train_overrides(tmp_path, digits, *QUIET_EVAL, "train.max_steps=100000", f"train.fault_timeout_s={timeout_s}")
    ranks = RankProcesses(overrides, tmp_path / "logs")
    wait_for_step(tmp_path, 3, ranks)
    return ranks


def exit_code_within(process, seconds: float):
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.slow
def test_a_killed_rank_makes_the_other_exit_nonzero_naming_it(tmp_path, digits):
    timeout_s = 10
    ranks = start_and_reach_step(tmp_path, digits, timeout_s)
    try:
        ranks.processes[1].kill()
        killed_at = time.monotonic()
        code = exit_code_within(ranks.processes[0], timeout_s + 20)
        waited = time.monotonic() - killed_at
    finally:
        ranks.kill()
    assert code not in (0, None), f"rank 0 still running or exited 0 {waited:.0f} s after rank 1 was killed"
    assert waited <= timeout_s + 15
    assert "rank(s) [1] stopped sending heartbeats" in ranks.output(0), ranks.output(0)[-3000:]


@pytest.mark.slow
def test_a_hung_rank_makes_the_other_exit_within_the_timeout_naming_it(tmp_path, digits):
    """Rank 1 frozen (SIGSTOP) holds rank 0 in a collective that never returns; rank 0's watchdog
    ends it with PEER_FAULT_EXIT once it has made no progress for train.fault_timeout_s."""
    timeout_s = 10
    ranks = start_and_reach_step(tmp_path, digits, timeout_s)
    try:
        ranks.processes[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = exit_code_within(ranks.processes[0], timeout_s + 30)
        waited = time.monotonic() - stopped_at
    finally:
        ranks.kill()
    assert code == PEER_FAULT_EXIT, f"rank 0 exit {code} after {waited:.0f} s:\n{ranks.output(0)[-3000:]}"
    assert timeout_s <= waited <= timeout_s + 20
    line = next(line for line in ranks.output(0).splitlines() if "peer fault" in line)
    assert "rank(s) [1] stopped sending heartbeats" in line and "train.fault_timeout_s=10" in line


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
