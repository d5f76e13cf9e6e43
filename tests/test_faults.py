"""Preemption, dead and hung ranks, NaN losses, kills mid-checkpoint and a killed launcher, on
real runs of clipdist.train (2 gloo ranks, DeepSpeed, digits shards; torchrun or no launcher).
The Slurm side is tests/test_slurm.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from clipdist.config import ConfigError, load_config, model_fingerprint
from clipdist.engine.checkpoint import Checkpointer, needs_universal_load, prune_checkpoints
from clipdist.faults import PEER_FAULT_EXIT, StopSignals, is_loader_worker_death, peer_error, requeue_slurm_job
from conftest import QUIET_EVAL, TRAIN_ENV, RankProcesses, losses, torchrun, torchrun_result, train_overrides, wait_for_step

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


def test_a_peer_failure_is_found_behind_a_dataloader_worker_death():
    """Under torchrun the agent SIGTERMs the survivor's process group: its DataLoader workers die,
    and their error is raised while the collective's is handled, so the gloo error is its context."""
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:1234: Connection reset by peer")
    try:
        try:
            raise gloo
        except RuntimeError:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated. ")
    except RuntimeError as error:
        assert peer_error(error) is gloo and is_loader_worker_death(error)
    assert peer_error(ValueError("a bug of this rank")) is None and not is_loader_worker_death(ValueError("x"))


EXPLAIN = textwrap.dedent(
    """
    import datetime, json, os, signal, threading, torch.distributed as dist
    from clipdist.faults import StopSignals, Watchdog
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    store.set("clipdist/heartbeat/1", json.dumps({"beats": 7, "progress": 3, "what": "step 3", "host": "node2", "pid": 1}))
    store.set("clipdist/heartbeat/2", json.dumps({"beats": 5, "progress": 3, "what": "step 3", "host": "node1", "pid": 2, "left": "peer fault"}))
    watchdog = Watchdog(1.0, rank=0, world_size=3, store_addr="127.0.0.1", store_port=store.port)
    threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGTERM)).start()  # as torchrun's, mid-explanation
    error = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [10.77.0.12]:3: Connection reset by peer. This is typically caused by")
    watchdog.explain(error, StopSignals())
    print("entry of rank 0:", store.get("clipdist/heartbeat/0").decode())
    """
)


def test_the_explanation_names_the_silent_peer_and_its_host_and_survives_a_sigterm():
    """Rank 1 stopped beating (dead), rank 2 left (a survivor that already explained): rank 0
    blames rank 1 on its host alone; torchrun's SIGTERM arriving meanwhile is noted, not fatal;
    rank 0's entry then says it left."""
    done = subprocess.run([sys.executable, "-c", EXPLAIN], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = peer_fault_line(done.stderr)
    assert line.startswith("clipdist: rank 0: peer fault: a collective failed (RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error [10.77.0.12]:3: Connection reset by peer) after SIGTERM; ")
    assert line.endswith("; peers: rank(s) [1] stopped sending heartbeats (dead, frozen or unreachable; on node2); exiting with status 3")
    assert '"left": "peer fault"' in done.stdout


LAUNCHED = textwrap.dedent(
    """
    import ctypes, json, os, sys, time
    time.sleep(float(sys.argv[1]))  # the launcher may exit meanwhile
    from clipdist.faults import _is_the_launcher, die_with_launcher
    reason = die_with_launcher()
    signal = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
    hold = float(sys.argv[2])  # seconds to stay, for a launched child to die with its launcher
    worker = os.fork() if hold else 0  # as a DataLoader worker is started
    if hold and worker == 0:
        time.sleep(hold)
        os._exit(0)
    report = {"reason": reason, "signal": signal.value, "parent_is_python": _is_the_launcher(os.getppid(), "torchrun"), "worker": worker}
    print(json.dumps(report), flush=True)
    time.sleep(hold)
    """
)
# Starts LAUNCHED (its arguments: seconds before asking, seconds to stay); prints the child's
# pid and waits for it, or exits at once when the child is to ask late.
LAUNCHER = "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', *sys.argv[1:]]); print(p.pid, flush=True); sys.exit(0 if sys.argv[2] != '0' else p.wait())"


def test_a_launched_process_dies_with_its_launcher_or_exits_when_that_died_first(tmp_path):
    """A child with torchrun's environment gets PR_SET_PDEATHSIG(SIGKILL): SIGKILLing its
    (Python) launcher kills it, and the child's own forked child (a loader worker) with it. A
    child whose launcher was gone before it asked is told so (it was adopted by init or a
    subreaper); without a launcher's environment nothing is set."""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, LAUNCHED, "0", "60"], stdout=subprocess.PIPE, text=True, env=env)
    gone_out = tmp_path / "gone.txt"
    with open(gone_out, "w") as out:  # the launcher exits at once; its child asks 1.5 s later
        subprocess.run([sys.executable, "-c", LAUNCHER, LAUNCHED, "1.5", "0"], stdout=out, env=env, check=True, timeout=60)
    plain = subprocess.run([sys.executable, "-c", LAUNCHED, "0", "0"], capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"})
    launched = [int(launcher.stdout.readline())]
    try:
        report = json.loads(launcher.stdout.readline())
        launched.append(report.pop("worker"))
        assert report == {"reason": None, "signal": signal.SIGKILL, "parent_is_python": True}
        launcher.kill()
        assert gone_within(launched, 10) is not None, f"{[pid for pid in launched if alive(pid)]} outlived the SIGKILLed launcher"
    finally:
        launcher.kill()
        launcher.wait()
        kill_all(launched)
    assert json.loads(plain.stdout)["reason"] is None and json.loads(plain.stdout)["signal"] == 0, plain.stderr[-2000:]
    deadline = time.monotonic() + 60
    while len(gone_out.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    orphan_pid, report = gone_out.read_text().splitlines()
    kill_all([int(orphan_pid)])
    orphan = json.loads(report)
    if orphan["parent_is_python"]:  # adopted by a Python init or subreaper: indistinguishable from torchrun
        assert orphan["reason"] is None
    else:
        assert orphan["reason"].startswith("torchrun, which started this process (parent pid ") and orphan["reason"].endswith("is gone")


def test_resume_auto_starts_fresh_without_a_checkpoint_and_latest_insists(tmp_path):
    checkpointer = Checkpointer(tmp_path, rank=0)
    assert checkpointer.resolve("auto") is None and checkpointer.resolve(None) is None
    with pytest.raises(ConfigError, match="train.resume=latest: no checkpoint"):
        checkpointer.resolve("latest")
    (tmp_path / "latest").write_text("step_00000007")
    with pytest.raises(ConfigError, match="names step_00000007, which does not exist"):
        checkpointer.resolve("auto")


def test_resume_refuses_what_is_not_a_checkpoint_it_can_continue(tmp_path):
    """train.resume names a checkpoint by its files alone (every rank sees the same), so each
    mistake is one ConfigError line before any engine or collective."""
    checkpoints = tmp_path / "run" / "checkpoints"
    step = checkpoints / "step_00000007"
    (step / "data").mkdir(parents=True)
    checkpointer = Checkpointer(checkpoints, rank=0)
    with pytest.raises(ConfigError, match=f"^train.resume: no such checkpoint directory: {tmp_path}/nothing$"):
        checkpointer.resolve(str(tmp_path / "nothing"))
    (tmp_path / "weights.pt").touch()
    with pytest.raises(ConfigError, match=r"^train.resume: .*weights.pt is a file; a checkpoint is a directory"):
        checkpointer.resolve(str(tmp_path / "weights.pt"))
    (checkpoints / "latest").write_text("step_00000007")
    with pytest.raises(ConfigError) as refused:  # the run's folder: the message names its checkpoint
        checkpointer.resolve(str(tmp_path / "run"))
    assert str(refused.value) == (
        f"train.resume: {tmp_path / 'run'} is not a clipdist checkpoint (it has no data/rank00000.json); its newest "
        f"checkpoint is {step} (or train.resume=latest with train.output_dir={tmp_path / 'run'})"
    )
    with pytest.raises(ConfigError, match="step_00000007 is not a clipdist checkpoint"):  # data positions are what resume needs
        checkpointer.resolve("latest")
    for rank in (0, 1):
        (step / "data" / f"rank{rank:05d}.json").write_text("{}")
    assert checkpointer.resolve("latest", zero_stage=0) == checkpointer.resolve(str(step)) == step
    assert not needs_universal_load(step, world_size=1)  # ZeRO-0: the one optimizer file loads on any world size
    (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").touch()
    assert checkpointer.resolve("latest", zero_stage=1) == checkpointer.resolve("latest", zero_stage=2) == step
    assert needs_universal_load(step, world_size=1) and not needs_universal_load(step, world_size=2)
    zero0, zero3 = checkpoints / "step_00000008", checkpoints / "step_00000009"
    for checkpoint, files in ((zero0, ["mp_rank_00_model_states.pt"]), (zero3, ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])):
        (checkpoint / "data").mkdir(parents=True)
        for name in ["data/rank00000.json", *files]:
            (checkpoint / name).write_text("{}")
    cases = {  # (checkpoint, this run's stage): what it was written with, the stages that can take it
        (step, 0): ("ZeRO-1/2 (the optimizer state partitioned per rank)", "1 or 2"),
        (step, 3): ("ZeRO-1/2 (the optimizer state partitioned per rank)", "1 or 2"),
        (zero3, 2): ("ZeRO-3 (parameters and optimizer state partitioned per rank)", "3"),
        (zero0, 1): ("ZeRO-0 (the whole optimizer state in one file)", "0"),
    }
    for (checkpoint, stage), (written, stages) in cases.items():
        with pytest.raises(ConfigError) as refused:
            checkpointer.resolve(str(checkpoint), zero_stage=stage)
        assert str(refused.value) == (
            f"train.resume: {checkpoint} was written with {written}, this run has deepspeed.zero_stage={stage}; "
            f"AdamW's moments do not carry over between the two: resume with deepspeed.zero_stage={stages}"
        )


def test_resume_refuses_a_checkpoint_of_another_model_naming_what_changed(tmp_path):
    """Each checkpoint records the model keys that decide its tensors (config.model_fingerprint);
    a run of another model stops in one line naming them, before any engine. Keys that may change
    between launches (gradient checkpointing, FLIP, compile, the name) are not among them."""
    tiny = load_config(["+experiment=tiny"])[0].model
    step = tmp_path / "step_00000004"
    (step / "data").mkdir(parents=True)
    (step / "data" / "rank00000.json").write_text("{}")
    (step / "model.json").write_text(json.dumps(model_fingerprint(tiny)))
    relaunch = dataclasses.replace(tiny, grad_checkpointing=True, patch_dropout=0.5, compile=True, name="renamed")
    assert Checkpointer(tmp_path, rank=0, model=model_fingerprint(relaunch)).resolve(str(step)) == step
    other = dataclasses.replace(tiny, embed_dim=64, vision=dataclasses.replace(tiny.vision, width=256), act="gelu")
    with pytest.raises(ConfigError) as refused:
        Checkpointer(tmp_path, rank=0, model=model_fingerprint(other)).resolve(str(step))
    assert str(refused.value) == (
        f"train.resume: {step} holds another model (model.embed_dim 128 → 64, model.act quick_gelu → gelu, model.vision.width 128 → 256); "
        "a checkpoint continues only the model that wrote it: set those keys back, or start a new run (train.resume=null)"
    )


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
    """SIGUSR1 to rank 1 alone, and to its loader worker (Slurm signals every process of a job
    step): both ranks stop after the same step k, checkpoint and exit 0. The restart
    (train.resume=auto) trains the next 20 steps with the uninterrupted run's losses (≤ 1e-6),
    and over the whole epoch (46 steps) every sample is trained exactly once."""
    common = [*QUIET_EVAL, "train.max_steps=46", "data.record_keys=true", "logging.log_every=1", "data.num_workers=1"]
    full_dir, run_dir = tmp_path / "full", tmp_path / "preempted"
    full = losses(torchrun(full_dir, digits, *common))

    ranks = RankProcesses(train_overrides(run_dir, digits, *common, "train.resume=auto"), tmp_path / "logs1")
    try:
        wait_for_step(run_dir, 5, ranks)
        workers = psutil.Process(ranks.processes[1].pid).children(recursive=True)
        assert workers, "rank 1 has its loader worker"
        for process in [ranks.processes[1], *workers]:
            process.send_signal(signal.SIGUSR1)
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


def peer_fault_line(output: str) -> str:
    """The survivor's one line; no traceback anywhere in its output."""
    lines = [line for line in output.splitlines() if "peer fault" in line]
    assert len(lines) == 1, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    return lines[0]


@pytest.mark.slow
def test_a_killed_rank_makes_the_other_exit_nonzero_naming_it(tmp_path, digits):
    """Without a launcher (as under srun): the survivor's collective breaks at once; it names the
    dead rank and its host in one line, with no traceback, and exits with PEER_FAULT_EXIT."""
    timeout_s = 10
    ranks = start_and_reach_step(tmp_path, digits, timeout_s)
    try:
        ranks.processes[1].kill()
        killed_at = time.monotonic()
        code = exit_code_within(ranks.processes[0], timeout_s + 20)
        waited = time.monotonic() - killed_at
    finally:
        ranks.kill()
    assert code == PEER_FAULT_EXIT, f"rank 0 exit {code} {waited:.0f} s after rank 1 was killed:\n{ranks.output(0)[-3000:]}"
    assert waited <= timeout_s + 15
    print(f"rank 0 exited {waited:.1f} s after rank 1 was killed")
    line = peer_fault_line(ranks.output(0))
    assert "a collective failed" in line and f"peers: rank(s) [1] stopped sending heartbeats (dead, frozen or unreachable; on {socket.gethostname()})" in line


# ---------------------------------------------------------------------------------------------
# Under torchrun, with DataLoader workers


def start_torchrun(run_dir: Path, digits: Path, log_dir: Path, *overrides: str) -> tuple[subprocess.Popen, SimpleNamespace]:
    """A torchrun agent with 2 ranks of 1 DataLoader worker each, past step 3; each rank's
    output in its own files under ``log_dir`` (the agent's own lines, its ChildFailedError
    traceback among them, go to ``log_dir``/agent.log)."""
    log_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects=3", f"--log-dir={log_dir}"]
    command += ["-m", "clipdist.train", *train_overrides(run_dir, digits, *QUIET_EVAL, "data.num_workers=1", "train.max_steps=100000", *overrides)]
    with open(log_dir / "agent.log", "w") as log:
        agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **TRAIN_ENV})
    watched = SimpleNamespace(processes=[agent], output=lambda rank: (log_dir / "agent.log").read_text())
    try:
        wait_for_step(run_dir, 3, watched)
    except BaseException:
        agent.kill()
        agent.wait()
        raise
    return agent, watched


def rank_output(log_dir: Path, rank: int) -> str:
    return "".join(path.read_text() for name in ("stdout.log", "stderr.log") for path in sorted(log_dir.glob(f"*/attempt_*/{rank}/{name}")))


def children(pid: int) -> list[int]:
    try:
        return [int(child) for task in os.listdir(f"/proc/{pid}/task") for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    return [d for child in children(pid) for d in [child, *descendants(child)]]


def rank_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the agent's ranks, from their environment."""
    pids = {}
    for pid in children(agent):
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        pids[int(environ["RANK"])] = pid
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def gone_within(pids: list[int], seconds: float) -> float | None:
    """Seconds until none of ``pids`` runs; None if some still runs after ``seconds``."""
    start = time.monotonic()
    while any(map(alive, pids)):
        if time.monotonic() - start > seconds:
            return None
        time.sleep(0.05)
    return time.monotonic() - start


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_under_torchrun_a_killed_rank_is_named_in_one_line_by_the_survivor(tmp_path, digits):
    """kill -9 of rank 1 while the loader workers run: the agent SIGTERMs rank 0's process group
    (its workers die of it), rank 0's collective breaks; rank 0 still names rank 1 and its host
    in one line, with no traceback in its output, and exits with PEER_FAULT_EXIT."""
    agent, _ = start_torchrun(tmp_path, digits, tmp_path / "logs", "train.fault_timeout_s=10")
    pids = rank_pids(agent.pid)
    try:
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        survivor_exit = gone_within([pids[0]], 40)
        code = exit_code_within(agent, 40)
    finally:
        agent.kill()
        agent.wait()
        kill_all(pids.values())
    agent_log = (tmp_path / "logs" / "agent.log").read_text()
    assert survivor_exit is not None and code not in (0, None), agent_log[-3000:]
    print(f"rank 0 exited {survivor_exit:.1f} s after rank 1 was killed; the agent {time.monotonic() - killed_at:.1f} s after")
    line = peer_fault_line(rank_output(tmp_path / "logs", 0))
    assert "a collective failed" in line or "DataLoader worker" in line
    assert f"peers: rank(s) [1] stopped sending heartbeats (dead, frozen or unreachable; on {socket.gethostname()})" in line
    assert f"exitcode  : {PEER_FAULT_EXIT}" in agent_log, agent_log[-3000:]  # rank 0's status, as torchrun reports it


@pytest.mark.slow
def test_ranks_and_their_loader_workers_die_with_a_sigkilled_torchrun_agent(tmp_path, digits):
    agent, _ = start_torchrun(tmp_path, digits, tmp_path / "logs")
    ranks = list(rank_pids(agent.pid).values())
    # A rank's loader workers are children of its forkserver (data/pipeline.py), itself the rank's.
    workers = [worker for rank in ranks for server in children(rank) for worker in children(server)]
    processes = ranks + [p for rank in ranks for p in descendants(rank)]
    try:
        assert len(ranks) == 2 and len(workers) >= 2, f"ranks {ranks}, with their forkservers and workers {processes}"
        killed_at = time.monotonic()
        agent.kill()
        gone_within(processes, 10)
        gone = time.monotonic() - killed_at
    finally:
        kill_all(processes)
    assert gone <= 10, f"still running 10 s after the agent's SIGKILL: {[pid for pid in processes if alive(pid)]}"
    print(f"ranks and workers gone {gone:.2f} s after the agent's SIGKILL")


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


WATCHDOG_MID_HEARTBEAT = """
import socket, sys, threading, time
import torch.distributed as dist
from clipdist.faults import Watchdog

store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
proxy = socket.create_server(("127.0.0.1", 0))


def pump(source, sink):  # forwards the store's traffic, 0.3 s late: a slow network
    while data := source.recv(65536):
        time.sleep(0.3)
        sink.sendall(data)


def serve():
    while True:
        client, _ = proxy.accept()
        upstream = socket.create_connection(("127.0.0.1", store.port))
        for pair in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=pair, daemon=True).start()


threading.Thread(target=serve, daemon=True).start()
watchdog = Watchdog(timeout_s=4.0, rank=1, world_size=2, store_addr="127.0.0.1", store_port=proxy.getsockname()[1]).start()
time.sleep(0.2)  # the first heartbeat is under way, inside the store client's C++
watchdog.stop()
print("heartbeat thread alive after stop():", watchdog._thread.is_alive())
sys.exit(0)
"""


@pytest.mark.timeout(120)
def test_a_finished_rank_exits_0_with_its_watchdog_mid_heartbeat():
    """Issue 14.5: a finished run's rank aborted at exit about once in 50 ("terminate called
    without an active exception", SIGABRT). The watchdog's daemon thread was inside a store call
    when Python exited, and a thread that comes back from C++ into a finalizing interpreter
    aborts the process. Here a heartbeat is under way over a slow link when the process stops its
    watchdog and exits: stop() waits for the thread (it did not), and the exit status is 0."""
    runs = [subprocess.run([sys.executable, "-c", WATCHDOG_MID_HEARTBEAT], capture_output=True, text=True, timeout=60) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-800:]
        assert "heartbeat thread alive after stop(): False" in run.stdout
