"""The test Slurm clusters, and only those: the tests never talk to a Slurm they did not start.

Two clusters, each started by a script of this repo and each with its own config file:

- one node (``tests/slurm/local-up.sh``): ``$SLURM_LOCAL_DIR/etc/slurm.conf``
  (default ``/tmp/slurm-local``), for ``tests/test_slurm.py``;
- two hosts in network namespaces (``tests/slurm/multinode/up.sh``):
  ``$MN_SLURM_DIR/etc/slurm.conf`` (default ``/tmp/mn-slurm``), for ``tests/test_slurm_multinode.py``.

Every Slurm command a test runs gets ``SLURM_CONF`` pointing at one of these (``Cluster.env``),
so neither ``/etc/slurm`` nor a ``SLURM_CONF`` of the caller's is ever used; the jobs inherit it
(sbatch exports the environment). ``.ci/run`` starts both clusters. Where one is not running,
``session`` starts it (and stops it at the end) if this process is root and the machine can; where
it cannot (not root, Slurm's daemons not installed, no network namespaces), the tests skip with
one line that says why (with CLIPDIST_REQUIRE_SLURM=1, as .ci/run sets, they fail instead).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "slurm"
READY_STATES = ("idle", "mixed", "allocated", "completing")
# Set by .ci/run: a test cluster that cannot be reached fails the Slurm tests instead of skipping them.
REQUIRE = "CLIPDIST_REQUIRE_SLURM"


@dataclass
class Cluster:
    name: str
    state_dir: Path
    nodes: list[str]
    up: list[str]  # the command that starts it (idempotent)
    down: list[str]  # the command that stops what ``up`` started
    needs: tuple[str, ...]  # commands it cannot start without
    namespaces: bool = False  # it needs network, UTS and mount namespaces
    started_here: bool = field(default=False, init=False)

    @property
    def conf(self) -> Path:
        return self.state_dir / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment, with every Slurm command pointed at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30, check: bool = False, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """A Slurm command (``scontrol``, ``sbatch`` ...) against this cluster."""
        return subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, check=check, env={**(env or os.environ), "SLURM_CONF": str(self.conf)}
        )

    def node_states(self) -> dict[str, str]:
        shown = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout
        return dict(line.split()[:2] for line in shown.splitlines() if len(line.split()) >= 2)

    def why_down(self) -> Optional[str]:
        """None when the controller answers and every node is ready, else what is wrong."""
        if not self.conf.exists():
            return f"no {self.conf}"
        if shutil.which("scontrol") is None:
            return "no scontrol on PATH"
        try:
            ping = self.run("scontrol", "ping", timeout=15)
            if "is UP" not in ping.stdout:
                said = (ping.stdout or ping.stderr).strip().splitlines()
                return f"slurmctld does not answer ({said[0] if said else ping.returncode})"
            states = self.node_states()
        except subprocess.TimeoutExpired:
            return "slurmctld does not answer (timeout)"
        not_ready = {node: states.get(node, "absent") for node in self.nodes if states.get(node, "").rstrip("*") not in READY_STATES}
        return f"node(s) not ready: {not_ready}" if not_ready else None

    def cannot_start(self) -> Optional[str]:
        """Why this process cannot start the cluster itself (None: it can)."""
        if os.geteuid() != 0:
            return "not root"
        missing = [command for command in self.needs if shutil.which(command) is None]
        if missing:
            return f"{', '.join(missing)} not installed"
        if self.namespaces:
            probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
            if probe.returncode != 0:
                return f"cannot create network namespaces (unshare: {probe.stderr.strip() or probe.returncode})"
        return None

    def start(self) -> None:
        started = subprocess.run(self.up, capture_output=True, text=True, timeout=300)
        if started.returncode != 0:
            pytest.fail(f"{' '.join(self.up)} failed ({started.returncode}):\n{started.stderr[-3000:]}", pytrace=False)
        self.started_here = True

    def stop(self) -> None:
        subprocess.run(self.down, capture_output=True, text=True, timeout=120)

    def repair(self) -> None:
        """Restart what is missing (``up`` is idempotent: a dead slurmd comes back, nodes left
        down are resumed), without taking over the stopping of the cluster."""
        repaired = subprocess.run(self.up, capture_output=True, text=True, timeout=300)
        assert repaired.returncode == 0, f"{' '.join(self.up)} failed ({repaired.returncode}):\n{repaired.stderr[-3000:]}"

    def lose_host(self, node: str) -> list[int]:
        """The host ``node`` of a namespaced cluster dies: SIGKILL every process in its network
        namespace (its slurmd, the slurmstepds, the job's tasks) and mark it DOWN, as slurmctld
        would itself once it stops answering (SlurmdTimeout). ``repair`` brings it back."""
        assert self.namespaces, "only a namespaced cluster can lose a host"
        pids = [int(pid) for pid in subprocess.run(["ip", "netns", "pids", f"mn-{node}"], capture_output=True, text=True).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.run("scontrol", "update", f"nodename={node}", "state=down", "reason=host lost (test)", check=True)
        return pids

    def hostname_of(self, pid: int) -> Optional[str]:
        """The host name process ``pid`` sees (its UTS namespace's), None once it is gone."""
        shown = subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True)
        return shown.stdout.strip() if shown.returncode == 0 else None


def one_node() -> Cluster:
    state_dir = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/slurm-local"))
    script = str(SCRIPTS / "local-up.sh")
    return Cluster(
        name="one-node Slurm (tests/slurm/local-up.sh)",
        state_dir=state_dir,
        nodes=[socket.gethostname().split(".")[0]],  # the script's `hostname -s`
        up=["bash", script],
        down=["bash", script, "--down"],
        needs=("slurmctld", "slurmd", "sbatch", "munged"),
    )


def multinode(hosts: int = 2) -> Cluster:
    state_dir = Path(os.environ.get("MN_SLURM_DIR", "/tmp/mn-slurm"))
    return Cluster(
        name="2-host Slurm (tests/slurm/multinode/up.sh)",
        state_dir=state_dir,
        nodes=[f"node{i}" for i in range(1, hosts + 1)],
        up=["bash", str(SCRIPTS / "multinode" / "up.sh"), str(hosts)],
        down=["bash", str(SCRIPTS / "multinode" / "down.sh")],
        needs=("slurmctld", "slurmd", "sbatch", "munged", "ip", "unshare", "nsenter"),
        namespaces=True,
    )


@contextlib.contextmanager
def session(cluster: Cluster) -> Iterator[Cluster]:
    """The running cluster; started here (and stopped afterwards) when it is down and we can, else
    the calling test skips with one line saying why."""
    down = cluster.why_down()
    if down is not None:
        cannot = cluster.cannot_start()
        if cannot is not None:
            how = "sudo " + " ".join(cluster.up).replace(str(ROOT) + "/", "") + " --fresh"
            why = f"{cluster.name} is not running ({down}) and cannot be started here: {cannot}; start it with `{how}`"
            if os.environ.get(REQUIRE) == "1":  # CI: these tests must run, not skip
                pytest.fail(f"{REQUIRE}=1: {why}", pytrace=False)
            pytest.skip(why)
        cluster.start()
        down = cluster.why_down()
        if down is not None:
            cluster.stop()
            pytest.fail(f"{cluster.name}: started, but {down}", pytrace=False)
    try:
        yield cluster
    finally:
        if cluster.started_here:
            cluster.stop()


def job_state(cluster: Cluster, job_id: str) -> dict[str, str]:
    shown = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))
