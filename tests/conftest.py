"""Shared test helpers. ``run_distributed`` runs a function on real gloo ranks (no mocks)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import torch.distributed as dist
import torch.multiprocessing as mp

from clipdist.data.digits import ensure_digits_shards

import slurm_cluster


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, result_dir: str, fn: Callable, args: tuple) -> None:
    # LOCAL_RANK too: DeepSpeed reads it, and torchrun sets it on one node.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A spawned child inherits "spawn" as its default start method; a rank started by torchrun
    # or deepspeed (a fresh interpreter) has Linux's "fork". Match the real launch, so that
    # DataLoader workers start in milliseconds rather than re-importing torch.
    multiprocessing.set_start_method("fork", force=True)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            outcome = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        outcome = ("error", traceback.format_exc())
    with open(os.path.join(result_dir, f"{rank}.tmp"), "wb") as f:
        pickle.dump(outcome, f)
    os.replace(os.path.join(result_dir, f"{rank}.tmp"), os.path.join(result_dir, f"{rank}.pkl"))


def run_distributed(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes that share an
    initialised gloo process group; return the per-rank return values (which must pickle).

    ``fn`` must be importable (module level). A rank that raises or dies fails the caller with
    RuntimeError carrying every failed rank's traceback; ranks still running (perhaps stuck in
    a collective) are killed. On ``timeout`` seconds all ranks are killed and TimeoutError raised.
    """
    port = free_port()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as result_dir:
        # Not daemonic: a rank may start DataLoader workers of its own.
        processes = [
            context.Process(target=_rank_main, args=(rank, world_size, port, result_dir, fn, args)) for rank in range(world_size)
        ]
        for p in processes:
            p.start()
        finished = False
        try:
            results = _collect_results(processes, result_dir, time.monotonic() + timeout, timeout)
            finished = True
            return results
        finally:
            for p in processes:
                p.join(timeout=10 if finished else 0)
                if p.is_alive():
                    p.kill()
                    p.join()


def _collect_results(processes: list, result_dir: str, deadline: float, timeout: float) -> list[Any]:
    world_size = len(processes)
    results: dict[int, tuple[str, Any]] = {}
    failed_at: Optional[float] = None
    while len(results) < world_size:
        for rank in set(range(world_size)) - set(results):
            alive = processes[rank].is_alive()  # before looking for the file: a rank writes, then exits
            path = os.path.join(result_dir, f"{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results[rank] = pickle.load(f)
            elif not alive:
                results[rank] = ("error", f"died with exit code {processes[rank].exitcode}")
        errors = {rank: value for rank, (status, value) in results.items() if status == "error"}
        if errors:
            # A rank that fails breaks its peers' collectives; give them a moment to report, then
            # list every failure in the order seen, so the root cause usually comes first.
            failed_at = failed_at or time.monotonic()
            if len(results) == world_size or time.monotonic() > failed_at + 3:
                report = "\n".join(f"--- rank {rank} of {world_size} failed:\n{value}" for rank, value in errors.items())
                raise RuntimeError(f"{len(errors)} rank(s) failed\n{report}")
        if len(results) < world_size and time.monotonic() > deadline:
            raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} still running after {timeout:.0f} s")
        time.sleep(0.05)
    return [value for _, value in (results[rank] for rank in range(world_size))]


# ---------------------------------------------------------------------------------------------
# Slurm: only the test clusters this repo's scripts start (tests/slurm_cluster.py)


@pytest.fixture(scope="session", autouse=True)
def outside_any_slurm_job():
    """Tests run as if outside Slurm, even when pytest runs inside a job (salloc, srun): a rank
    they start must not read the enclosing job's rank variables, nor `scontrol requeue` it, nor
    reach the caller's Slurm through its SLURM_CONF. The Slurm tests pass their own SLURM_CONF."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("SLURM_")}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def slurm_one_node():
    """The one-node test Slurm of tests/slurm/local-up.sh (skips with the reason if unavailable)."""
    with slurm_cluster.session(slurm_cluster.one_node()) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_multinode():
    """The 2-host test Slurm of tests/slurm/multinode/up.sh (skips with the reason if unavailable)."""
    with slurm_cluster.session(slurm_cluster.multinode(2)) as cluster:
        yield cluster


# ---------------------------------------------------------------------------------------------
# End-to-end runs of the real entry point


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    ensure_digits_shards(str(out))
    return out


@pytest.fixture(scope="session")
def quickstart_ring_run(tmp_path_factory) -> Path:
    """The digits quickstart with loss=ring (2 ranks, ~35 s here; 93-98 % zero-shot top-1): the
    trained model of the tests that need one (test_train.py: the ring loss learns; and
    test_clip_benchmark.py: clip_benchmark scores its export as clipdist does)."""
    digits = tmp_path_factory.mktemp("digits")  # its own: `digits` is per module (the same shards)
    ensure_digits_shards(str(digits))
    run_dir = tmp_path_factory.mktemp("quickstart_ring")
    torchrun(run_dir, digits, "loss=ring", "loss.chunk_size=48", "logging.wandb_mode=disabled", experiment="digits")
    return run_dir


def train_overrides(run_dir: Path, digits: Path, *overrides: str, experiment: str = "tiny") -> list[str]:
    """`+experiment=...` on the digits shards at ``digits``, writing to ``run_dir``, then ``overrides``."""
    return [
        f"+experiment={experiment}",
        f"data.train_urls='{digits}/train-{{000000..000003}}.tar'",
        f"eval.zero_shot.0.urls='{digits}/eval-{{000000..000001}}.tar'",
        f"eval.retrieval.0.urls='{digits}/eval-{{000000..000001}}.tar'",
        f"train.output_dir={run_dir}",
        *overrides,
    ]


QUIET_EVAL = ["eval.zero_shot=[]", "eval.retrieval=[]"]  # runs whose eval is not under test
TRAIN_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def torchrun(run_dir: Path, digits: Path, *overrides: str, nproc: int = 2, experiment: str = "tiny") -> list[dict]:
    """Run `torchrun -m clipdist.train +experiment=...` and return its metrics.jsonl rows."""
    result, rows = torchrun_result(run_dir, digits, *overrides, nproc=nproc, experiment=experiment)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return rows


def torchrun_result(
    run_dir: Path, digits: Path, *overrides: str, nproc: int = 2, experiment: str = "tiny", script: Optional[list[str]] = None
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """torchrun of clipdist.train (or of ``script``, e.g. tests/inject.py with its arguments),
    whatever its exit: the completed process and the metrics.jsonl rows written."""
    target = script or ["-m", "clipdist.train"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    command += train_overrides(run_dir, digits, *overrides, experiment=experiment)
    result = subprocess.run(command, capture_output=True, text=True, timeout=540, env={**os.environ, **TRAIN_ENV})
    metrics = run_dir / "metrics.jsonl"
    return result, [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def entry_point(module: str, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m <module> <arguments>` in one process, without a launcher (world size 1)."""
    command = [sys.executable, "-m", module, *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **TRAIN_ENV})


def one_line_error(result: subprocess.CompletedProcess, kind: str) -> str:
    """The line ``clipdist: <kind>: ...`` of a refused run, after checking what every refusal
    shows: exit status 2, that line alone among clipdist's on stderr, no traceback anywhere."""
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("clipdist: ")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert lines[0].startswith(f"clipdist: {kind}: "), lines[0]
    return lines[0]


class RankProcesses:
    """``python -m clipdist.train`` once per rank, without torchrun (as srun starts them), so a
    test can signal, stop or kill one rank; each rank's output goes to ``<log_dir>/rankN.log``."""

    def __init__(self, overrides: list[str], log_dir: Path, world_size: int = 2, command: Optional[list[str]] = None):
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{rank}.log" for rank in range(world_size)]
        self.processes = []
        for rank in range(world_size):
            env = {
                **os.environ, **TRAIN_ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            }  # fmt: skip
            with open(self.logs[rank], "w") as log:
                argv = [sys.executable, *(command or ["-m", "clipdist.train"]), *overrides]
                self.processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))

    def wait(self, timeout: float) -> list[Optional[int]]:
        """Exit codes (None: still running after ``timeout`` seconds in all)."""
        deadline = time.monotonic() + timeout
        for p in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        return [p.poll() for p in self.processes]

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for_step(run_dir: Path, step: int, ranks: RankProcesses, timeout: float = 180) -> None:
    """Until metrics.jsonl has a row of ``step`` or later (fails if a rank exits first)."""
    deadline, metrics = time.monotonic() + timeout, run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.strip()):
            return
        exited = [rank for rank, p in enumerate(ranks.processes) if p.poll() is not None]
        assert not exited, f"rank(s) {exited} exited before step {step}:\n{ranks.output(exited[0])[-3000:]}"
        time.sleep(0.1)
    raise TimeoutError(f"no step {step} in {metrics} after {timeout} s")


def keys_by_step(lines_of_ranks, accum_steps: int) -> dict[tuple[int, int], set[str]]:
    """(epoch, step) -> the sample keys trained at that step over the ranks, from each rank's
    data.record_keys lines ("epoch micro-batch key ..."), written with ``accum_steps``."""
    batches: dict[tuple[int, int], set[str]] = {}
    for lines in lines_of_ranks:
        for line in lines:
            epoch, micro_batch, *keys = line.split()
            batches.setdefault((int(epoch), int(micro_batch) // accum_steps), set()).update(keys)
    return batches


def losses(rows: list[dict]) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
