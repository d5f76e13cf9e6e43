"""The sbatch scripts under a real Slurm (tests/slurm/local-up.sh brings one up; .ci/run does):
a 2-task CPU job of slurm/train_rn50.sh (EXPERIMENT=tiny) is signalled mid-run (scancel
--signal=USR1, what --signal=USR1@120 sends), checkpoints, requeues itself, resumes from its
checkpoint and ends with the uninterrupted run's final loss. Preemption by a job of a higher
partition is tested across two hosts (tests/test_slurm_multinode.py, the elastic resume).

Every Slurm command goes to that test cluster through SLURM_CONF (tests/slurm_cluster.py), never
to /etc/slurm; where it is not running and cannot be started here, these tests skip and say why.

Timings (signal → requeue → restart → resumed → done) go to <tmp>/slurm-timings.json and the
console (pytest -s)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET_EVAL, TRAIN_ENV, torchrun
from slurm_cluster import Cluster, job_state

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 60
# The run each job trains: short, so that the tests see the whole cycle.
OVERRIDES = [*QUIET_EVAL, f"train.max_steps={STEPS}"]
# The node of tests/slurm/local-up.sh has 2 CPUs and no GPU.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


@pytest.fixture(scope="module")
def cluster(slurm_one_node):
    return slurm_one_node


@pytest.fixture(scope="module")
def uninterrupted_final_loss(tmp_path_factory, digits):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    torchrun(run_dir, digits, *train_urls(digits), *OVERRIDES)
    return json.loads((run_dir / "summary.json").read_text())["final_loss"]


def train_urls(digits: Path) -> list[str]:
    return [f"data.train_urls='{digits}/train-{{000000..000003}}.tar'"]


class Job:
    """A submitted sbatch job of slurm/train_rn50.sh and its run directory."""

    def __init__(self, cluster: Cluster, tmp_path: Path, digits: Path, *sbatch_args: str):
        self.cluster = cluster
        self.run_dir = tmp_path / "run"
        self.output = tmp_path / "job.out"
        env = {
            **cluster.env, **TRAIN_ENV, "EXPERIMENT": "tiny", "CLIPDIST_ROOT": str(ROOT), "PYTHON": sys.executable,
            "RUN_ROOT": str(tmp_path), "RUN_NAME": "run",
        }  # fmt: skip
        command = ["sbatch", "--parsable", *CPU_JOB, f"--output={self.output}", *sbatch_args, str(ROOT / "slurm" / "train_rn50.sh")]
        submitted = subprocess.run([*command, *train_urls(digits), *OVERRIDES], capture_output=True, text=True, env=env, check=True)
        self.id = submitted.stdout.strip().split(";")[0]
        self.submitted_at = time.time()

    def state(self) -> dict[str, str]:
        return job_state(self.cluster, self.id)

    def wait_for(self, predicate, what: str, timeout: float = 240) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return time.time()
            state = self.state().get("JobState")
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), f"job {self.id} {state} before {what}:\n{self.log()[-4000:]}"
            time.sleep(0.2)
        raise TimeoutError(f"job {self.id}: no {what} after {timeout} s (state {self.state()}):\n{self.log()[-4000:]}")

    def steps_logged(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return 0
        return max((json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()), default=0)

    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def cancel(self) -> None:
        self.cluster.run("scancel", self.id)


def check_cycle(job: Job, preempted_at: float, expected_final_loss: float, tmp_path: Path, how: str) -> dict:
    """Wait for requeue → restart → resumed → COMPLETED; check the result; return the timings."""
    checkpointed = job.wait_for(lambda: (job.run_dir / "checkpoints" / "latest").exists(), "checkpoint")
    restarted = job.wait_for(lambda: "restart 1 on" in job.log(), "restart after requeue")
    resumed = job.wait_for(lambda: "resumed from" in job.log().split("restart 1 on")[-1], "resume from the checkpoint")
    done = job.wait_for(lambda: job.state().get("JobState") == "COMPLETED", "completion")
    state, log = job.state(), job.log()
    assert state["Restarts"] == "1", state
    resumed_line = next(line for line in log.splitlines() if "resumed from" in line)
    step = int(re.search(r"at step (\d+)", resumed_line).group(1))
    assert 5 <= step < STEPS, resumed_line
    assert "requeued Slurm job" in log, log[-4000:]
    final_loss = json.loads((job.run_dir / "summary.json").read_text())["final_loss"]
    assert abs(final_loss - expected_final_loss) <= 1e-6, (final_loss, expected_final_loss)
    timings = {
        "how": how,
        "stopped_at_step": step,
        "signal_to_checkpoint_s": round(checkpointed - preempted_at, 1),
        "signal_to_restart_s": round(restarted - preempted_at, 1),
        "signal_to_resumed_s": round(resumed - preempted_at, 1),
        "signal_to_completed_s": round(done - preempted_at, 1),
    }
    with open(tmp_path.parent / "slurm-timings.json", "a") as f:
        f.write(json.dumps(timings) + "\n")
    print(json.dumps(timings))
    return timings


def test_scancel_usr1_checkpoints_requeues_and_resumes_to_the_same_final_loss(cluster, tmp_path, digits, uninterrupted_final_loss):
    """`scancel --signal=USR1` (what --signal=USR1@120 sends before the time limit) to the job's
    ranks mid-run."""
    job = Job(cluster, tmp_path, digits)
    try:
        job.wait_for(lambda: job.steps_logged() >= 5, "step 5")
        cluster.run("scancel", "--signal=USR1", job.id, check=True)
        check_cycle(job, time.time(), uninterrupted_final_loss, tmp_path, "scancel --signal=USR1")
    finally:
        job.cancel()


def test_hydra_submitit_sweep_trains_each_point_as_a_two_rank_slurm_job(cluster, tmp_path, digits):
    """`python -m clipdist.train -m hydra/launcher=clipdist_slurm ...` (Hydra's multirun on the
    training entry point itself): submitit submits the point with sbatch, its two tasks
    rendezvous from Slurm's variables and train in the point's own job directory."""
    launcher = ["hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    command = [
        sys.executable, "-m", "clipdist.train", "-m", "hydra/launcher=clipdist_slurm", *launcher, f"hydra.sweep.dir={tmp_path}",
        "+experiment=tiny", *train_urls(digits), *QUIET_EVAL, "train.max_steps=3", "optim.lr=1e-3",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env={**cluster.env, **TRAIN_ENV}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "0" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (tmp_path / "0" / "checkpoints" / "latest").read_text() == "step_00000003"
