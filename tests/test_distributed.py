"""Launcher-environment parsing, Slurm host lists, process-group setup and the gather collective."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_distributed

from clipdist.distributed import (
    DistEnv,
    DistEnvError,
    all_gather_with_grad,
    all_reduce_sum,
    expand_hostlist,
    expand_tasks_per_node,
    is_main_process,
    world_size_from_env,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

TORCHRUN_ENV = {
    "RANK": "5",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "node-a",
    "MASTER_PORT": "29400",
}

SLURM_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "6",
    "SLURM_LOCALID": "2",
    "SLURM_NTASKS": "8",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[003-004]",
}


def test_torchrun_environment():
    assert DistEnv.from_environ(TORCHRUN_ENV) == DistEnv(
        rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1, num_nodes=2, master_addr="node-a", master_port=29400
    )


def test_deepspeed_launcher_environment():
    # The deepspeed launcher names the per-node values LOCAL_SIZE / CROSS_RANK / CROSS_SIZE.
    env = {k: v for k, v in TORCHRUN_ENV.items() if k not in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")}
    env.update(LOCAL_SIZE="4", CROSS_RANK="1", CROSS_SIZE="2")
    assert DistEnv.from_environ(env) == DistEnv.from_environ(TORCHRUN_ENV)


def test_slurm_environment():
    assert DistEnv.from_environ(SLURM_ENV) == DistEnv(
        # port: 20000 + 123456 % 20000
        rank=6, local_rank=2, world_size=8, local_world_size=4, node_rank=1, num_nodes=2, master_addr="gpu003", master_port=23456
    )


def test_slurm_heterogeneous_tasks_and_overrides():
    env = {**SLURM_ENV, "SLURM_TASKS_PER_NODE": "5,3", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "0"}
    env.update(MASTER_ADDR="gpu003-ib", MASTER_PORT="31000")
    del env["SLURM_NNODES"]
    env["SLURM_JOB_NUM_NODES"] = "2"
    parsed = DistEnv.from_environ(env)
    assert (parsed.local_world_size, parsed.master_addr, parsed.master_port, parsed.num_nodes) == (3, "gpu003-ib", 31000, 2)


def test_torchrun_takes_precedence_over_slurm():
    assert DistEnv.from_environ({**SLURM_ENV, **TORCHRUN_ENV}) == DistEnv.from_environ(TORCHRUN_ENV)


def test_single_process_environment():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.num_nodes) == (0, 1, 0, 1, 0, 1)
    assert world_size_from_env({}) == 1
    assert world_size_from_env(SLURM_ENV) == 8


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        ({"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "WORLD_SIZE"),
        ({k: v for k, v in TORCHRUN_ENV.items() if k != "MASTER_PORT"}, "MASTER_PORT"),
        ({k: v for k, v in TORCHRUN_ENV.items() if k != "LOCAL_WORLD_SIZE"}, "LOCAL_WORLD_SIZE"),
        ({"SLURM_PROCID": "0"}, "SLURM_LOCALID"),
        ({k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST"),
        ({k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID"),
        ({k: v for k, v in SLURM_ENV.items() if k != "SLURM_TASKS_PER_NODE"}, "SLURM_TASKS_PER_NODE"),
    ],
)
def test_partial_environment_names_the_missing_variable(environ, missing):
    with pytest.raises(DistEnvError, match=f"^{missing} is not set"):
        DistEnv.from_environ(environ)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"RANK": "8"}, "rank 8 is outside world size 8"),
        ({"LOCAL_RANK": "4"}, "local rank 4 is outside local world size 4"),
        ({"RANK": "five"}, "RANK='five' is not an integer"),
    ],
)
def test_inconsistent_environment(override, message):
    with pytest.raises(DistEnvError, match=message):
        DistEnv.from_environ({**TORCHRUN_ENV, **override})
    assert issubclass(DistEnvError, ValueError)


def test_slurm_node_without_tasks_entry():
    with pytest.raises(DistEnvError, match="SLURM_NODEID=1 has no entry"):
        DistEnv.from_environ({**SLURM_ENV, "SLURM_TASKS_PER_NODE": "8"})


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("a,b,c", ["a", "b", "c"]),
        ("node[09-11]", ["node09", "node10", "node11"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("single", ["single"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", "gpu[1-", "gpu[3-1]", "gpu[a]", "a,,b", "gpu]1[", "gpu[[1]]", "gpu[]"])
def test_expand_hostlist_rejects_malformed(hostlist):
    with pytest.raises(ValueError, match="malformed Slurm host list"):
        expand_hostlist(hostlist)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8(x3),4") == [8, 8, 8, 4]
    with pytest.raises(DistEnvError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node("8x3")


def test_helpers_without_process_group():
    # Single process, no group: the collectives reduce to the identity.
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_sum(t), torch.tensor([1.0, 2.0]))
    assert is_main_process()


def _gather_and_backward(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(6, dtype=torch.float64).reshape(3, 2).add(100 * rank).requires_grad_()
    gathered = all_gather_with_grad(x)
    # A different weight per rank, so the backward must sum the weights over ranks.
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    return gathered.detach(), x.grad


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_all_gather_with_grad_two_ranks():
    results = run_distributed(_gather_and_backward, world_size=2)
    rows = [torch.arange(6, dtype=torch.float64).reshape(3, 2).add(100 * r) for r in range(2)]
    weights = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    summed_weights = weights * 1 + weights * 2  # sum over ranks of each rank's weight
    for rank, (gathered, grad) in enumerate(results):
        # Reference: concatenation in rank order; gradient = summed weights on our slice. Exact.
        assert torch.equal(gathered, torch.cat(rows)), f"rank {rank} gathered the wrong rows"
        assert torch.equal(grad, summed_weights[3 * rank : 3 * rank + 3]), f"rank {rank} gradient is not the sum over ranks"


def _gather_unequal(rank: int, world_size: int) -> str:
    try:
        all_gather_with_grad(torch.zeros(2 + rank, 4))
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_all_gather_with_grad_rejects_unequal_sizes():
    # Both ranks must raise (rather than one hanging in the gather).
    for message in run_distributed(_gather_unequal, world_size=2):
        assert "same local batch on every rank, got sizes [2, 3]" in message


_WORKER = textwrap.dedent(
    """
    import os, torch
    from clipdist.distributed import DistEnv, all_reduce_sum, destroy_distributed, init_distributed
    env = DistEnv.from_environ()
    init_distributed(env)
    init_distributed(env)  # idempotent
    total = all_reduce_sum(torch.tensor([env.rank + 1.0])).item()
    print(env.rank, env.world_size, total, os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"])
    destroy_distributed()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_environ() -> dict[str, str]:
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launcher_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_init_distributed_from_slurm_environment():
    # Two real processes that see only Slurm's variables (as srun sets them on one node).
    port = _free_port()
    procs = []
    for rank in range(2):
        env = _clean_environ()
        env.update(
            SLURM_JOB_ID="77", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="2",
            SLURM_NODEID="0", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port),
        )  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=100) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err}"
        # Reference: sum of (rank + 1) over 2 ranks = 3; env vars exported for DeepSpeed.
        assert out.split() == [str(rank), "2", "3.0", str(rank), "2", str(port)]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_init_distributed_single_process():
    # World size 1 needs no free port: it must not touch the TCP port in MASTER_PORT.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = _clean_environ()
        env["MASTER_PORT"] = str(busy.getsockname()[1])
        out = subprocess.run([sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "1.0", "0", "1", env["MASTER_PORT"]]
