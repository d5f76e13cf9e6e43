"""Launch scripts: shell syntax, and the Slurm rendezvous they derive through clipdist.distributed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sh")) + [ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def rendezvous(environ):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    return subprocess.run(
        [sys.executable, "-m", "clipdist.distributed", "rendezvous"], capture_output=True, text=True, env={**clean, **environ}
    )


def test_rendezvous_from_slurm_variables_of_a_per_node_launcher():
    """One srun task per node: node 2 of 4, hosts from a compressed list, port from the job id."""
    result = rendezvous(
        {
            "SLURM_PROCID": "2",
            "SLURM_LOCALID": "0",
            "SLURM_NTASKS": "4",
            "SLURM_NODEID": "2",
            "SLURM_NNODES": "4",
            "SLURM_TASKS_PER_NODE": "1(x4)",
            "SLURM_JOB_NODELIST": "gpu[007-009],gpu012",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    assert exports == {"MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 4242), "NODE_RANK": "2", "NNODES": "4"}


def test_rendezvous_names_the_missing_variable():
    result = rendezvous({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "clipdist: launch environment: SLURM_NNODES is not set (other Slurm variables are, so a Slurm launch is assumed)"
    )
