"""The real sbatch scripts across two hosts: `sbatch --nodes=2 --ntasks-per-node=2
slurm/train_vitl.sh` (and slurm/train_rn50.sh) on the 2-host test Slurm of
tests/slurm/multinode/up.sh: node1 (10.77.0.11) and node2 (10.77.0.12), each with its own host
name, network namespace and /etc/hosts; .ci/run starts it, and so does the `slurm_multinode`
fixture where it is down and this is root (else these tests skip and say why).

The scripts stay the real recipes (their own experiment, vitl14 / rn50: optimizer, ZeRO stage,
gradient checkpointing); the command line makes them CPU-sized: a tiny model of the same
family, the digits shards, a few steps, 2 nodes × 2 CPU tasks. Each test checks, for its script:

- ranks 0-1 ran on node1 and ranks 2-3 on node2: the host name of each rank's process (read in
  its own UTS namespace while it trains), and rank 0's "process group ready ... on node1" line;
- rendezvous went to node1: every rank's master is `node1` at 20000 + job id mod 20000, and the
  ranks on node2 hold TCP connections from node2's address to node1's address at that port;
- the gradients were all-reduced across the hosts: every step's loss equals that of a 4-rank
  single-host torchrun run of the same config within 1e-5.

The faults across hosts (slurm/train_rn50.sh with rn_tiny, 30 steps, data.record_keys=true,
against one shared 4-rank single-host run of the same config):

- preemption by `scancel --signal=USR1`: every rank on both hosts stops after the same step k
  (each rank's recorded batches, the "stopping after step k" lines), the shared run directory
  holds one complete checkpoint (step k), the job requeues itself, restarts on node[1-2],
  resumes at k and ends with the uninterrupted final loss (≤ 1e-6) having drawn exactly its
  batches on every rank;
- elastic resume: `sbatch --nodes=1-2 slurm/train_vitl.sh` (ZeRO-2), preempted by a job in
  partition `high` (our `debug` has PreemptMode=REQUEUE) with node2 drained, requeues onto node1
  alone and finishes on 2 ranks with the uninterrupted 2-host job's batches, losses and final
  weights (≤ 1e-5);
- node loss: every process on node2 SIGKILLed and node2 marked DOWN: the node1 ranks name ranks
  [2, 3] on node2 in one line each (unless srun --kill-on-bad-exit ends the second once the
  first has exited) and are gone within train.fault_timeout_s + 30 s, no
  traceback, nothing left on either host; Slurm requeues the job and, node2 back, it resumes from
  the newest complete checkpoint and completes with the uninterrupted final loss;
- two 2-node jobs at once on the same nodes rendezvous at their own ports and both complete.

Timings (sbatch → running → first step → completed; signal → checkpoint written → requeued →
first resumed step; node loss → all ranks gone → requeued; node back → resumed → completed) go
to <tmp>/slurm-multinode-timings.json and the console (pytest -s).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from clipdist.export import checkpoint_state_dict
from conftest import QUIET_EVAL, TRAIN_ENV, keys_by_step, losses, torchrun
from slurm_cluster import Cluster, job_state

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES, TASKS_PER_NODE = 2, 2
WORLD = NODES * TASKS_PER_NODE
STEPS = 20
# The #SBATCH lines ask for 8 nodes × 8 GPUs × 12 CPUs and 48 h; these options win over them.
CPU_JOB = [f"--nodes={NODES}", f"--ntasks-per-node={TASKS_PER_NODE}", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
# The ViT job keeps its global batch whatever the node count (the elastic test below requeues it
# onto one host) and records its keys: 4 ranks × 8 × 1 micro-batch, or 2 ranks × 8 × 2.
KEPT_BATCH = ("train.global_batch=32", "train.accum_steps=auto", "data.record_keys=true")
# script -> (its own experiment, the tiny model of the same family, further overrides)
SCRIPTS = {"train_vitl.sh": ("vitl14", "vit_tiny", KEPT_BATCH), "train_rn50.sh": ("rn50", "rn_tiny", ())}
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def cpu_sized(model: str, digits: Path, steps: int = STEPS) -> list[str]:
    """Hydra overrides that shrink a recipe to a CPU run: the recipe's optimizer, ZeRO stage and
    gradient checkpointing stay (bf16 becomes fp32 on a CPU, as on any CPU-only machine)."""
    return [
        f"model={model}", "data=digits", f"data.train_urls='{digits}/train-{{000000..000003}}.tar'", "data.local_batch=8",
        "optim.warmup_steps=2", f"train.max_steps={steps}", "logging.log_every=1", *QUIET_EVAL,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(slurm_multinode):
    return slurm_multinode


def host_addresses(cluster: Cluster) -> dict[str, str]:
    """node name -> IP, from the cluster's private /etc/hosts (what the nodes resolve)."""
    hosts = (cluster.state_dir / "hosts").read_text().split("\n")
    return {fields[1]: fields[0] for fields in (line.split() for line in hosts) if len(fields) >= 2}


def _proc_text(pid: str, name: str) -> Optional[bytes]:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return None


def rank_processes(job_id: str) -> dict[int, int]:
    """rank -> pid of the job's `python -m clipdist.train` processes started by slurmstepd (the
    hosts share one process table, as the login node of a cluster with shared /proc would not)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv = (_proc_text(pid, "cmdline") or b"").split(b"\0")
        if b"clipdist.train" not in argv or not os.path.basename(argv[0]).startswith(b"python"):
            continue
        stat, environ = _proc_text(pid, "stat"), _proc_text(pid, "environ")
        if stat is None or environ is None:
            continue
        ppid = stat.rsplit(b")", 1)[1].split()[1].decode()
        if (_proc_text(ppid, "comm") or b"").strip() != b"slurmstepd":
            continue
        variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        if variables.get(b"SLURM_JOB_ID") == job_id.encode() and b"SLURM_PROCID" in variables:
            found[int(variables[b"SLURM_PROCID"])] = int(pid)
    return found


def established_tcp(pid: int) -> set[tuple[str, int, str, int]]:
    """(local ip, port, remote ip, port) of process ``pid``'s own ESTABLISHED TCP connections:
    the rows of its network namespace's /proc/PID/net/tcp{,6} whose socket inode is one of its
    file descriptors (c10d's sockets are IPv6 ones with IPv4-mapped addresses)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])

    def address(hex_address: str) -> tuple[str, int]:
        ip, port = hex_address.split(":")
        raw = bytes.fromhex(ip)
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words in host order
        if raw[:12] == b"\0" * 10 + b"\xff\xff":  # ::ffff:a.b.c.d
            raw = raw[12:]
        return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw), int(port, 16)

    connections = set()
    for table in ("net/tcp", "net/tcp6"):
        for line in (_proc_text(str(pid), table) or b"").decode().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "01" and fields[9] in inodes:
                connections.add((*address(fields[1]), *address(fields[2])))
    return connections


class Observed:
    """What the test sees of the job's rank processes while they train: each one's host name
    and its own TCP connections."""

    def __init__(self, cluster: Cluster, job_id: str):
        self.cluster, self.job_id = cluster, job_id
        self.hosts: dict[int, str] = {}
        self.tcp: dict[int, set[tuple[str, int, str, int]]] = {}

    def look(self) -> None:
        for rank, pid in rank_processes(self.job_id).items():
            if rank not in self.hosts:
                host = self.cluster.hostname_of(pid)
                if host:
                    self.hosts[rank] = host
            self.tcp.setdefault(rank, set()).update(established_tcp(pid))

    def connections(self, rank: int, port: Optional[int] = None, other_than: Optional[int] = None) -> set[tuple[str, str]]:
        """(local ip, remote ip) of ``rank``'s connections to remote ``port`` (or to any port but
        ``other_than``)."""
        return {
            (local, remote) for local, _, remote, rport in self.tcp.get(rank, ())
            if (port is None or rport == port) and rport != other_than
        }  # fmt: skip

    def complete(self, port: int) -> bool:
        """All hosts known, and each node2 rank seen connected to the store and to a peer."""
        node2_ranks = range(TASKS_PER_NODE, WORLD)
        return len(self.hosts) == WORLD and all(self.connections(r, port=port) and self.connections(r, other_than=port) for r in node2_ranks)


def master_port(job_id: str) -> int:
    """clipdist/distributed.py's port for a Slurm job."""
    return 20000 + int(job_id) % 20000


def submit(
    cluster: Cluster, script: str, tmp_path: Path, digits: Path, model: str, sbatch_args: tuple = (), overrides: Optional[list[str]] = None,
    job: list[str] = CPU_JOB, python: Optional[dict] = None,
) -> tuple[str, Path, Path]:
    """``python``: launch.sh's PYTHON and what it needs, instead of this interpreter."""
    run_root, output = tmp_path, tmp_path / "job.out"
    env = {
        **cluster.env, **TRAIN_ENV, "CLIPDIST_ROOT": str(ROOT), "PYTHON": sys.executable, "RUN_ROOT": str(run_root),
        "RUN_NAME": "run", "WANDB_MODE": "disabled", **(python or {}),
    }  # fmt: skip
    env.pop("EXPERIMENT", None)  # the script's own: vitl14 / rn50
    overrides = cpu_sized(model, digits) if overrides is None else overrides
    command = ["sbatch", "--parsable", *job, f"--output={output}", *sbatch_args, str(ROOT / "slurm" / script), *overrides]
    submitted = cluster.run(*command, env=env, check=True)
    return submitted.stdout.strip().split(";")[0], run_root / "run", output


def first_step_logged(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and any('"train/loss"' in line for line in metrics.read_text().splitlines())


@dataclass
class TwoHostRun:
    """A completed 2-host job of a script, and what was seen of it while it ran."""

    job_id: str
    run_dir: Path
    output: Path
    observed: Observed
    timings: dict


@pytest.fixture(scope="module")
def two_host_runs(cluster, tmp_path_factory, digits):
    """script -> its 2-host job, run once (the elastic test's uninterrupted reference, too)."""
    runs: dict[str, TwoHostRun] = {}

    def run(script: str) -> TwoHostRun:
        if script not in runs:
            runs[script] = run_two_host_job(cluster, tmp_path_factory.mktemp(f"two-hosts-{script}"), digits, script)
        return runs[script]

    return run


def run_two_host_job(cluster: Cluster, tmp_path: Path, digits: Path, script: str) -> TwoHostRun:
    _, model, extra = SCRIPTS[script]
    submitted_at = time.time()
    job_id, run_dir, output = submit(cluster, script, tmp_path, digits, model, overrides=[*cpu_sized(model, digits), *extra])
    observed = Observed(cluster, job_id)
    running_at = first_step_at = None
    try:
        deadline = time.monotonic() + 300
        while True:
            state = job_state(cluster, job_id).get("JobState", "?")
            if running_at is None and state in ("RUNNING", "COMPLETING", "COMPLETED"):
                running_at = time.time()
            if first_step_at is None and first_step_logged(run_dir):
                first_step_at = time.time()
            if state == "RUNNING" and not observed.complete(master_port(job_id)):
                observed.look()
            if state in FINAL_STATES:
                break
            assert time.monotonic() < deadline, f"job {job_id} still {state} after 300 s:\n{log_of(output)[-4000:]}"
            time.sleep(0.2)
        done_at = time.time()
    finally:
        cluster.run("scancel", job_id)
    timings = {
        "sbatch_to_running_s": round(running_at - submitted_at, 1) if running_at else None,
        "running_to_first_step_s": round(first_step_at - running_at, 1) if first_step_at and running_at else None,
        "sbatch_to_first_step_s": round(first_step_at - submitted_at, 1) if first_step_at else None,
        "sbatch_to_completed_s": round(done_at - submitted_at, 1),
    }
    return TwoHostRun(job_id, run_dir, output, observed, timings)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sbatch_script_trains_across_two_hosts_like_one_host(cluster, tmp_path, digits, script, two_host_runs):
    experiment, model, extra = SCRIPTS[script]
    addresses = host_addresses(cluster)
    run = two_host_runs(script)
    job_id, run_dir, output, observed = run.job_id, run.run_dir, run.output, run.observed
    log, shown = log_of(output), job_state(cluster, job_id)
    assert shown.get("JobState") == "COMPLETED" and shown.get("ExitCode") == "0:0", f"job {job_id}: {shown}\n{log[-5000:]}"
    assert "Traceback" not in log, log[-5000:]
    assert shown.get("NodeList") == "node[1-2]", shown

    # Where each rank ran, from host names: each rank's "process group ready: rank R/4 on HOST"
    # line where it logged one (rank 0 does), and the host name its process saw while it trained.
    port = master_port(job_id)
    ready = {int(rank): host for rank, host in re.findall(r"process group ready: rank (\d+)/4 on (\S+) backend gloo master node1:" + str(port) + r"\b", log)}
    assert ready.get(0) == "node1", f"no 'process group ready: rank 0/4 on node1 ... master node1:{port}' line:\n{log[-5000:]}"
    expected = {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    assert {**observed.hosts, **ready} == expected, (observed.hosts, ready)
    assert all(observed.hosts.get(rank, host) == host for rank, host in ready.items()), (observed.hosts, ready)
    assert "restart 0 on node[1-2]: 4 ranks" in log, log[:2000]

    # Rendezvous at node1 (`node1` in every rank's master, node1's address in node2's /etc/hosts):
    # the ranks on node2 hold connections from node2's address to node1's at the master port (the
    # store), and to node1's address at other ports (gloo's pairs, which carry the all-reduces).
    node1, node2 = addresses["node1"], addresses["node2"]
    for rank in (2, 3):
        assert observed.connections(rank, port=port) == {(node2, node1)}, (rank, port, observed.tcp.get(rank))
        assert (node2, node1) in observed.connections(rank, other_than=port), (rank, observed.tcp.get(rank))

    # All-reduced across the hosts: the losses of one host's 4-rank run of the same config.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["steps"] == STEPS, summary
    two_hosts = losses([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
    one_host = losses(torchrun(tmp_path / "one-host", digits, *cpu_sized(model, digits), *extra, nproc=WORLD, experiment=experiment))
    assert sorted(two_hosts) == sorted(one_host) == list(range(1, STEPS + 1)), (two_hosts, one_host)
    max_diff = max(abs(two_hosts[step] - one_host[step]) for step in one_host)
    assert max_diff <= 1e-5, {step: (two_hosts[step], one_host[step]) for step in one_host}

    record(tmp_path, {
        "script": script, "experiment": f"{experiment} with {model}, {STEPS} steps, {NODES} hosts x {TASKS_PER_NODE} CPU ranks",
        **run.timings, "loss_max_abs_diff_vs_one_host": max_diff,
    })  # fmt: skip


def log_of(output: Path) -> str:
    return output.read_text() if output.exists() else ""


# ---------------------------------------------------------------------------------------------
# Preemption and node loss across the two hosts (slurm/train_rn50.sh, rn_tiny, 2 hosts × 2 ranks)

FAULT_STEPS = 30  # about 1.3 epochs of the digits shards at global batch 32
GONE_WITHIN_S = 60  # node loss -> no rank left; well inside train.fault_timeout_s (600) + 30 s
PREEMPTED = ("rn50", "rn_tiny")


def fault_overrides(digits: Path, *extra: str) -> list[str]:
    return [*cpu_sized(PREEMPTED[1], digits, steps=FAULT_STEPS), "data.record_keys=true", *extra]


def keys_of(run_dir: Path) -> dict[int, list[str]]:
    """rank -> its data.record_keys lines ("epoch batch key ..."), appended over the launches."""
    return {rank: (run_dir / "keys" / f"rank{rank:05d}.txt").read_text().splitlines() for rank in range(WORLD)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits) -> dict:
    """One 4-rank single-host torchrun run of the jobs' config (their losses equal a 2-host run's,
    as the test above shows): its final loss and each rank's recorded keys."""
    run_dir = tmp_path_factory.mktemp("uninterrupted-4-ranks")
    torchrun(run_dir, digits, *fault_overrides(digits), nproc=WORLD, experiment=PREEMPTED[0])
    return {"final_loss": json.loads((run_dir / "summary.json").read_text())["final_loss"], "keys": keys_of(run_dir)}


class Job:
    """A submitted 2-host job of slurm/train_rn50.sh (or of ``script`` with ``overrides``), its
    log and run directory."""

    def __init__(
        self, cluster: Cluster, tmp_path: Path, digits: Path, *sbatch_args: str, extra: tuple = (), script: str = "train_rn50.sh",
        overrides: Optional[list[str]] = None, job: list[str] = CPU_JOB, python: Optional[dict] = None,
    ):  # fmt: skip
        self.cluster = cluster
        overrides = fault_overrides(digits, *extra) if overrides is None else overrides
        self.id, self.run_dir, self.output = submit(cluster, script, tmp_path, digits, PREEMPTED[1], sbatch_args, overrides, job=job, python=python)

    def state(self) -> dict[str, str]:
        return job_state(self.cluster, self.id)

    def log(self) -> str:
        return log_of(self.output)

    def steps_logged(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        return max((json.loads(line).get("step", 0) for line in rows if line.strip()), default=0)

    def latest(self) -> Optional[str]:
        latest = self.run_dir / "checkpoints" / "latest"
        return latest.read_text().strip() if latest.exists() else None

    def wait_for(self, predicate, what: str, timeout: float = 240, bad=("FAILED", "CANCELLED", "TIMEOUT", "BOOT_FAIL", "DEADLINE")) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return time.time()
            state = self.state().get("JobState")
            assert state not in bad, f"job {self.id} {state} before {what}:\n{self.log()[-5000:]}"
            time.sleep(0.2)
        raise TimeoutError(f"job {self.id}: no {what} after {timeout} s ({self.state()}):\n{self.log()[-5000:]}")

    def processes(self) -> dict[str, list[int]]:
        """host -> pids of this job's clipdist processes (ranks and their loader workers) in that
        host's network namespace."""
        found = {}
        for host in self.cluster.nodes:
            listed = subprocess.run(["ip", "netns", "pids", f"mn-{host}"], capture_output=True, text=True).stdout.split()
            for pid in listed:
                argv = _proc_text(pid, "cmdline") or b""
                environ = _proc_text(pid, "environ") or b""
                if b"clipdist.train" in argv and f"SLURM_JOB_ID={self.id}\0".encode() in environ:
                    found.setdefault(host, []).append(int(pid))
        return found

    def cancel(self) -> None:
        self.cluster.run("scancel", self.id)


def record(tmp_path: Path, timings: dict) -> None:
    with open(tmp_path.parent / "slurm-multinode-timings.json", "a") as f:
        f.write(json.dumps(timings) + "\n")
    print(json.dumps(timings))


def check_preemption_cycle(job: Job, signalled_at: float, uninterrupted: dict, tmp_path: Path, how: str) -> dict:
    """After the stop signal: every rank on both hosts stops after the same step k, one complete
    checkpoint (step k) lands in the shared run directory, the job requeues itself, restarts on
    both hosts, resumes from step k and completes with the uninterrupted run's final loss and
    exactly its samples."""
    checkpointed = job.wait_for(lambda: job.latest() is not None, "checkpoint")
    requeued = job.wait_for(lambda: "requeued Slurm job" in job.log(), "requeue")
    restarted = job.wait_for(lambda: "restart 1 on" in job.log(), "restart after requeue")
    # Between the launches (the old ranks are gone, the new ones are still starting).
    k = int(job.latest().removeprefix("step_"))
    assert 5 <= k < FAULT_STEPS, job.latest()
    checkpoints = sorted(path.name for path in (job.run_dir / "checkpoints").iterdir() if path.name.startswith("step_"))
    assert checkpoints == [f"step_{k:08d}"], checkpoints  # one, complete (no .partial)
    first_launch = {rank: len(lines) for rank, lines in keys_of(job.run_dir).items()}
    assert first_launch == {rank: k for rank in range(WORLD)}, f"the ranks did not all stop after step {k}: {first_launch}"
    stopped = re.findall(r"stopping after step (\d+)", job.log())
    assert stopped and set(stopped) == {str(k)}, stopped
    resumed_step = job.wait_for(lambda: job.steps_logged() > k, "first resumed step")
    done = job.wait_for(lambda: job.state().get("JobState") == "COMPLETED", "completion")

    state, log = job.state(), job.log()
    assert not job.processes(), f"left behind: {job.processes()}"
    assert state["Restarts"] == "1" and state["NodeList"] == "node[1-2]" and state["ExitCode"] == "0:0", state
    second = log.split("restart 1 on", 1)[1]
    assert second.startswith(" node[1-2]: 4 ranks"), second[:300]
    assert re.search(r"resumed from \S+step_0*%d at step %d" % (k, k), second), second[-5000:]
    assert re.search(r"process group ready: rank 0/4 on node1 ", second), second[-5000:]
    assert "Traceback" not in log, log[-5000:]
    final_loss = json.loads((job.run_dir / "summary.json").read_text())["final_loss"]
    assert abs(final_loss - uninterrupted["final_loss"]) <= 1e-6, (final_loss, uninterrupted["final_loss"])
    # No sample repeated or skipped: each rank drew exactly the uninterrupted run's batches, in order.
    keys = keys_of(job.run_dir)
    assert keys == uninterrupted["keys"], {rank: (len(keys[rank]), len(uninterrupted["keys"][rank])) for rank in keys}
    union = lambda by_rank: sorted(key for lines in by_rank.values() for line in lines for key in line.split()[2:])  # noqa: E731
    assert union(keys) == union(uninterrupted["keys"])

    timings = {
        "how": how, "hosts": f"{NODES} hosts x {TASKS_PER_NODE} CPU ranks, {PREEMPTED[1]}, {FAULT_STEPS} steps", "stopped_after_step": k,
        "signal_to_checkpoint_written_s": round(checkpointed - signalled_at, 1),
        "signal_to_requeued_s": round(requeued - signalled_at, 1),
        "requeue_to_restart_s": round(restarted - requeued, 1),
        "requeue_to_first_resumed_step_s": round(resumed_step - requeued, 1),
        "restart_to_first_resumed_step_s": round(resumed_step - restarted, 1),
        "signal_to_completed_s": round(done - signalled_at, 1),
        "final_loss_abs_diff": abs(final_loss - uninterrupted["final_loss"]),
    }  # fmt: skip
    record(tmp_path, timings)
    return timings


def test_scancel_usr1_stops_both_hosts_after_the_same_step_and_the_requeued_job_ends_like_an_uninterrupted_one(cluster, tmp_path, digits, uninterrupted):
    """`scancel --signal=USR1` (what --signal=USR1@120 sends before the time limit) reaches the
    ranks on node1 and node2."""
    job = Job(cluster, tmp_path, digits)
    try:
        job.wait_for(lambda: job.steps_logged() >= 5, "step 5")
        signalled_at = time.time()
        cluster.run("scancel", "--signal=USR1", job.id, check=True)
        check_preemption_cycle(job, signalled_at, uninterrupted, tmp_path, "scancel --signal=USR1, 2 hosts")
    finally:
        job.cancel()


def test_a_job_preempted_on_two_hosts_finishes_on_one_with_the_model_of_the_uninterrupted_two_host_job(cluster, tmp_path, digits, two_host_runs):
    """Elastic resume on the cluster: `sbatch --nodes=1-2 slurm/train_vitl.sh` (ZeRO-2, as its
    recipe; global batch 32 kept with train.accum_steps=auto) starts on both hosts. node2 is
    drained (no new job lands there; ours runs on), and a 1-node job in partition `high` on node1
    preempts ours: Slurm signals our ranks on both hosts, they checkpoint after the same step k
    and requeue. The requeued job starts on node1 alone with 2 ranks, turns the 4 ranks' ZeRO
    partitions into a universal checkpoint, accumulates 2 micro-batches per step and finishes:
    - every step after k trains exactly the uninterrupted 2-host job's global batch (keys), and
      its loss within 1e-5; the final weights equal that job's within 1e-5;
    - summary.json and run_info.json record the launches' world sizes, 4 then 2."""
    reference = two_host_runs("train_vitl.sh")
    _, model, extra = SCRIPTS["train_vitl.sh"]
    # Whole nodes and no task count, as the script asks (Slurm would keep a task count of 4 for
    # the requeued job): 2 ranks per node from CLIPDIST_TASKS_PER_NODE, on however many nodes.
    elastic_job = ["--nodes=1-2", "--exclusive", "--gpus-per-node=0", "--time=15", "--partition=debug"]
    job = Job(
        cluster, tmp_path, digits, script="train_vitl.sh", overrides=[*cpu_sized(model, digits), *extra], job=elastic_job,
        python={"CLIPDIST_TASKS_PER_NODE": str(TASKS_PER_NODE)},
    )  # fmt: skip
    high = None
    try:
        job.wait_for(lambda: job.steps_logged() >= 5, "step 5")
        assert job.state()["NodeList"] == "node[1-2]", job.state()
        cluster.run("scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=elastic-resume-test", check=True)
        signalled_at = time.time()
        high = cluster.run(
            "sbatch", "--parsable", "--partition=high", "--nodes=1", "--nodelist=node1", "--exclusive",
            f"--output={tmp_path}/high.out", "--wrap", "sleep 2", check=True,
        ).stdout.strip()  # fmt: skip
        checkpointed = job.wait_for(lambda: job.latest() is not None, "checkpoint")
        restarted = job.wait_for(lambda: "restart 1 on" in job.log(), "restart after requeue")
        done = job.wait_for(lambda: job.state().get("JobState") == "COMPLETED", "completion")
    finally:
        job.cancel()
        if high:
            cluster.run("scancel", high)
        cluster.run("scontrol", "update", "NodeName=node2", "State=RESUME")

    state, log = job.state(), job.log()
    assert not job.processes(), f"left behind: {job.processes()}"
    assert state["Restarts"] == "1" and state["NodeList"] == "node1" and state["ExitCode"] == "0:0", state
    assert "Traceback" not in log, log[-5000:]
    first, second = log.split("restart 1 on", 1)
    stopped = set(re.findall(r"stopping after step (\d+)", first))
    assert len(stopped) == 1, stopped  # every rank on both hosts after the same step
    k = int(stopped.pop())
    assert 5 <= k < STEPS and second.startswith(" node1: 2 ranks"), (k, second[:300])
    assert re.search(r"resumed from \S+step_0*%d at step %d, written by 4 rank\(s\), on 2" % (k, k), second), second[-5000:]
    converted = re.search(r"converted \S+ \(ZeRO partitions of 4 rank\(s\)\) to a universal checkpoint in ([\d.]+) s", second)
    assert converted, second[-5000:]
    assert "global batch 32 = 8 local × 2 ranks × 2 accumulation" in second, second[-5000:]

    # The steps after k: the uninterrupted job's global batches and losses.
    lines = keys_of(job.run_dir)  # ranks 0-3: k lines of the first launch; then ranks 0-1: 2 per step
    assert [len(lines[rank]) for rank in range(WORLD)] == [k + 2 * (STEPS - k)] * 2 + [k] * 2, {r: len(v) for r, v in lines.items()}
    ours = {**keys_by_step((lines[rank][:k] for rank in range(WORLD)), 1), **keys_by_step((lines[rank][k:] for rank in (0, 1)), 2)}
    theirs = keys_by_step(keys_of(reference.run_dir).values(), 1)
    assert ours == theirs and len(theirs) == STEPS, {step: (len(ours.get(step, ())), len(theirs[step])) for step in theirs}
    resumed_losses = losses([json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()])
    reference_losses = losses([json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()])
    assert sorted(resumed_losses) == list(range(1, STEPS + 1)), sorted(resumed_losses)
    loss_diff = max(abs(resumed_losses[step] - reference_losses[step]) for step in range(k + 1, STEPS + 1))
    assert loss_diff <= 1e-5, {step: (resumed_losses[step], reference_losses[step]) for step in range(k + 1, STEPS + 1)}
    final, uninterrupted = (checkpoint_state_dict(run_dir / "checkpoints" / f"step_{STEPS:08d}") for run_dir in (job.run_dir, reference.run_dir))
    assert final.keys() == uninterrupted.keys()
    weight_diff = max((final[name].float() - uninterrupted[name].float()).abs().max().item() for name in final)
    assert weight_diff <= 1e-5, weight_diff

    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["launch_world_sizes"] == [4, 2] and summary["global_batch"] == 32, summary
    info = json.loads((job.run_dir / "run_info.json").read_text())
    assert [launch["world_size"] for launch in [*info["previous_launches"], info]] == [4, 2], info
    assert checkpointed - signalled_at < 30, "checkpointed after Slurm's GraceTime: the signal did not reach the ranks"
    assert job_state(cluster, high).get("JobState") == "COMPLETED", job_state(cluster, high)
    record(tmp_path, {
        "how": "sbatch --nodes=1-2 slurm/train_vitl.sh (vit_tiny, ZeRO-2) preempted on 2 hosts, node2 drained, requeued onto node1",
        "stopped_after_step": k, "signal_to_checkpoint_written_s": round(checkpointed - signalled_at, 1),
        "signal_to_restart_s": round(restarted - signalled_at, 1), "universal_conversion_s": float(converted.group(1)),
        "signal_to_completed_s": round(done - signalled_at, 1), "loss_max_abs_diff": loss_diff, "final_weights_max_abs_diff": weight_diff,
    })  # fmt: skip


def test_node2_lost_mid_training_the_node1_ranks_name_it_and_exit_and_the_requeued_job_resumes_when_it_is_back(cluster, tmp_path, digits, uninterrupted):
    """node2 dies at step ≥ 12: every process there (slurmd, slurmstepd, the ranks) is SIGKILLed
    and the node is marked DOWN (what slurmctld does itself after SlurmdTimeout=30 s). Slurm
    cancels the job on node1 (SIGTERM, SIGKILL after KillWait=10 s) and requeues it (--requeue);
    the ranks on node1 each print one line naming ranks 2-3 on node2 (or, the second of them,
    are killed by srun --kill-on-bad-exit once the first has exited), with no traceback, and are
    gone well within train.fault_timeout_s + 30 s; no process of the job is left on either host.
    Once node2 is back (its slurmd restarted) the job resumes on both hosts from the newest
    complete checkpoint (train.checkpoint_every=5) and ends with the uninterrupted run's final loss.

    The default train.fault_timeout_s (600 s): heartbeats every 2 s at most, so a survivor's two
    looks at its peers' heartbeats take 5 s and its line comes before slurmstepd's SIGKILL at
    KillWait=10 s. (With beats every 5 s, as before, they were killed before the line.)"""
    job = Job(cluster, tmp_path, digits, extra=("train.checkpoint_every=5",))
    node2_down = False
    try:
        job.wait_for(lambda: job.steps_logged() >= 12, "step 12")
        assert len(job.processes().get("node2", [])) >= 2, job.processes()
        lost_at = time.time()
        node2_down = True
        cluster.lose_host("node2")
        newest = job.latest()  # complete checkpoints only: no rank can finish another without node2
        assert newest is not None and newest >= "step_00000010", newest
        gone = job.wait_for(lambda: not job.processes(), "all ranks gone", timeout=GONE_WITHIN_S, bad=())
        requeued = job.wait_for(lambda: job.state().get("JobState") == "PENDING", "requeue", timeout=60, bad=("FAILED", "CANCELLED", "COMPLETED"))
        log = job.log()
        faults = [line for line in log.splitlines() if "peer fault" in line]
        # Each node1 rank names the lost ranks, unless srun --kill-on-bad-exit killed it first:
        # the first survivor to exit (status 3) ends the step, and the other may still be
        # looking at the heartbeats (~5 s) then. One line naming node2 is what must not be lost.
        named = {rank for rank in (0, 1) if f"rank {rank}: peer fault" in " ".join(faults)}
        killed = {int(task) for task in re.findall(r"srun: error: node1: task (\d+): Killed", log)}
        assert named and named | killed == {0, 1} and len(faults) == len(named), "\n".join(faults) or log[-5000:]
        assert all("rank(s) [2, 3] stopped sending heartbeats" in line and "on node2)" in line for line in faults), "\n".join(faults)
        assert "Traceback" not in log, log[-5000:]
        steps_before = job.steps_logged()

        assert cluster.node_states().get("node2", "").startswith("down"), cluster.node_states()
        back_at = time.time()
        cluster.repair()  # node2's slurmd starts again and the node returns to service
        node2_down = False
        restarted = job.wait_for(lambda: "restart 1 on" in job.log(), "restart once node2 is back", bad=("FAILED", "CANCELLED"))
        resumed = job.wait_for(lambda: "resumed from" in job.log().split("restart 1 on", 1)[1], "resume", bad=("FAILED", "CANCELLED"))
        done = job.wait_for(lambda: job.state().get("JobState") == "COMPLETED", "completion", bad=("FAILED", "CANCELLED"))
    finally:
        job.cancel()
        if node2_down:
            cluster.repair()
    state, log = job.state(), job.log()
    assert not job.processes(), f"left behind: {job.processes()}"
    second = log.split("restart 1 on", 1)[1]
    assert second.startswith(" node[1-2]: 4 ranks"), second[:300]
    step = int(newest.removeprefix("step_"))
    assert re.search(r"resumed from \S+%s at step %d" % (newest, step), second), second[-5000:]
    assert "Traceback" not in log, log[-5000:]
    assert state["NodeList"] == "node[1-2]" and state["ExitCode"] == "0:0", state
    final_loss = json.loads((job.run_dir / "summary.json").read_text())["final_loss"]
    assert abs(final_loss - uninterrupted["final_loss"]) <= 1e-6, (final_loss, uninterrupted["final_loss"])
    record(tmp_path, {
        "how": f"node2 lost (every process there SIGKILLed, node marked DOWN) after step >= 12, newest checkpoint {newest}",
        "fault_timeout_s": 600, "steps_logged_before_loss": steps_before,
        "node_loss_to_all_ranks_gone_s": round(gone - lost_at, 1),
        "node_loss_to_requeued_s": round(requeued - lost_at, 1),
        "node_back_to_restart_s": round(restarted - back_at, 1),
        "node_back_to_resumed_s": round(resumed - back_at, 1),
        "node_back_to_completed_s": round(done - back_at, 1),
        "final_loss_abs_diff": abs(final_loss - uninterrupted["final_loss"]),
    })  # fmt: skip


def test_two_concurrent_two_node_jobs_on_the_same_nodes_rendezvous_apart_and_both_complete(cluster, tmp_path, digits):
    """Two 2-node jobs (1 rank per node each) submitted at once share node1 and node2: each
    rendezvouses at its own port (20000 + job id mod 20000) on node1, they train at the same time,
    and both complete. Job b runs as on hosts whose own name resolves to 127.0.1.1 (Debian's
    /etc/hosts without DNS; tests/slurm/loopback_hostname.sh), where gloo would offer the other
    host a loopback address: launch.socket_ifname=eth0 pins its ranks to the cluster network."""
    # --oversubscribe: the scripts ask for whole nodes (--exclusive); these two small jobs share them.
    one_rank_per_node = [f"--nodes={NODES}", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15", "--oversubscribe"]
    jobs = []
    loopback_hostname = {"PYTHON": str(ROOT / "tests" / "slurm" / "loopback_hostname.sh"), "REAL_PYTHON": sys.executable}
    for name, extra, python in (("a", [], None), ("b", ["launch.socket_ifname=eth0"], loopback_hostname)):
        (tmp_path / name).mkdir()
        overrides = [*cpu_sized("rn_tiny", digits, steps=8), *extra]
        jobs.append(submit(cluster, "train_rn50.sh", tmp_path / name, digits, "rn_tiny", overrides=overrides, job=one_rank_per_node, python=python))
    ids = [job_id for job_id, _, _ in jobs]
    together = False
    try:
        deadline = time.monotonic() + 240
        while True:
            states = [job_state(cluster, job_id).get("JobState", "?") for job_id in ids]
            together = together or all(state == "RUNNING" for state in states)
            if all(state in FINAL_STATES for state in states):
                break
            assert time.monotonic() < deadline, f"jobs {ids}: {states} after 240 s"
            time.sleep(0.2)
    finally:
        for job_id in ids:
            cluster.run("scancel", job_id)
    assert together, "the two jobs never ran at the same time"
    ports = []
    for (job_id, run_dir, output), via in zip(jobs, ("", " via eth0")):
        shown, log = job_state(cluster, job_id), log_of(output)
        assert shown.get("JobState") == "COMPLETED" and shown.get("NodeList") == "node[1-2]", f"job {job_id}: {shown}\n{log[-4000:]}"
        ready = re.search(r"process group ready: rank 0/2 on node1 backend gloo master node1:(\d+)" + via + "\n", log)
        assert ready and int(ready.group(1)) == master_port(job_id), log[-4000:]
        assert log.count(f"on node2 backend gloo master node1:{ready.group(1)}{via}\n") == 1, "rank 1's line, on node2"
        ports.append(int(ready.group(1)))
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert ports[0] != ports[1], ports
