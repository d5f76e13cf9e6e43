"""Process-group setup and the few collectives the rest of clipdist uses.

This is the only module that knows about launchers: torchrun (and the DeepSpeed launcher),
Slurm's srun, or a plain single process. Everything else asks for a ``DistEnv`` or uses the
collective helpers below, which also work at world size 1 without a process group.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Slurm jobs derive their port from the job id so that two jobs sharing a node don't collide.
SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 20000

# Any of these means a torchrun-style launcher (torchrun, deepspeed) set up the environment.
_TORCHRUN_MARKERS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


class DistEnvError(ValueError):
    """The launcher environment is partial or inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> DistEnv:
        """torchrun's variables win over Slurm's; with neither, a single process."""
        if any(name in environ for name in _TORCHRUN_MARKERS):
            env = _from_torchrun(environ)
        elif "SLURM_PROCID" in environ:
            env = _from_slurm(environ)
        else:
            env = cls(
                rank=0,
                local_rank=0,
                world_size=1,
                local_world_size=1,
                node_rank=0,
                num_nodes=1,
                master_addr=environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
                master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_MASTER_PORT,
            )
        env._check()
        return env

    def _check(self) -> None:
        checks = [
            (self.world_size >= 1, f"world size must be >= 1, got {self.world_size}"),
            (0 <= self.rank < self.world_size, f"rank {self.rank} is outside world size {self.world_size}"),
            (self.local_world_size >= 1, f"local world size must be >= 1, got {self.local_world_size}"),
            (0 <= self.local_rank < self.local_world_size, f"local rank {self.local_rank} is outside local world size {self.local_world_size}"),
            (0 <= self.node_rank < self.num_nodes, f"node rank {self.node_rank} is outside {self.num_nodes} node(s)"),
            (0 < self.master_port < 65536, f"master port {self.master_port} is not a valid port"),
        ]
        for ok, message in checks:
            if not ok:
                raise DistEnvError(f"inconsistent launcher environment: {message}")


def _require(environ: Mapping[str, str], name: str, launcher: str) -> str:
    if name not in environ:
        raise DistEnvError(f"{name} is not set (other {launcher} variables are, so a {launcher} launch is assumed)")
    return environ[name]


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistEnvError(f"{name}={environ[name]!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if name in environ:
            return _int(environ, name)
    return None


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        _require(environ, name, "torchrun")
    world_size = _int(environ, "WORLD_SIZE")
    # The DeepSpeed launcher spells the per-node values LOCAL_SIZE / CROSS_RANK / CROSS_SIZE.
    local_world_size = _first_int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    if local_world_size is None:
        raise DistEnvError("LOCAL_WORLD_SIZE is not set (other torchrun variables are, so a torchrun launch is assumed)")
    rank = _int(environ, "RANK")
    node_rank = _first_int(environ, "GROUP_RANK", "CROSS_RANK")
    num_nodes = _first_int(environ, "GROUP_WORLD_SIZE", "CROSS_SIZE")
    return DistEnv(
        rank=rank,
        local_rank=_int(environ, "LOCAL_RANK"),
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=rank // local_world_size if node_rank is None else node_rank,
        num_nodes=math.ceil(world_size / local_world_size) if num_nodes is None else num_nodes,
        master_addr=environ["MASTER_ADDR"],
        master_port=_int(environ, "MASTER_PORT"),
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    for name in ("SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID"):
        _require(environ, name, "Slurm")
    num_nodes = _first_int(environ, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    if num_nodes is None:
        raise DistEnvError("SLURM_NNODES is not set (other Slurm variables are, so a Slurm launch is assumed)")
    node_rank = _int(environ, "SLURM_NODEID")
    if "SLURM_NTASKS_PER_NODE" in environ:
        local_world_size = _int(environ, "SLURM_NTASKS_PER_NODE")
    else:
        tasks_per_node = expand_tasks_per_node(_require(environ, "SLURM_TASKS_PER_NODE", "Slurm"))
        if not 0 <= node_rank < len(tasks_per_node):
            raise DistEnvError(f"SLURM_NODEID={node_rank} has no entry in SLURM_TASKS_PER_NODE={environ['SLURM_TASKS_PER_NODE']!r}")
        local_world_size = tasks_per_node[node_rank]
    # A step may run on a subset of the job's nodes; its own node list then comes first.
    nodelist_name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in environ), None)
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif nodelist_name is None:
        raise DistEnvError("SLURM_JOB_NODELIST is not set (other Slurm variables are, so a Slurm launch is assumed)")
    else:
        try:
            master_addr = expand_hostlist(environ[nodelist_name])[0]
        except ValueError as e:
            raise DistEnvError(f"{nodelist_name}: {e}") from None
    if "MASTER_PORT" in environ:
        master_port = _int(environ, "MASTER_PORT")
    else:
        _require(environ, "SLURM_JOB_ID", "Slurm")
        master_port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_RANGE
    return DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        local_rank=_int(environ, "SLURM_LOCALID"),
        world_size=_int(environ, "SLURM_NTASKS"),
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master_addr,
        master_port=master_port,
    )


def expand_tasks_per_node(s: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE, e.g. "8(x3),4" -> [8, 8, 8, 4]."""
    counts: list[int] = []
    for part in s.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise DistEnvError(f"SLURM_TASKS_PER_NODE={s!r} is not of the form '8(x4),2'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


_HOSTLIST_TOKEN = re.compile(r"[^,\[\]]+|\[[^\[\]]*\]")


def expand_hostlist(s: str) -> list[str]:
    """Expand a Slurm compressed host list: "gpu[001-003,010],cpu7" -> gpu001 gpu002 gpu003 gpu010 cpu7.

    Zero padding is kept, and a name may hold several bracket groups ("rack[1-2]-n[01-02]").
    """
    hosts: list[str] = []
    for name in _split_top_level_commas(s):
        pieces = _HOSTLIST_TOKEN.findall(name)
        if not name or "".join(pieces) != name:
            raise ValueError(f"malformed Slurm host list {s!r}")
        expanded = [""]
        for piece in pieces:
            choices = _expand_bracket(piece[1:-1], s) if piece.startswith("[") else [piece]
            expanded = [prefix + choice for prefix in expanded for choice in choices]
        hosts.extend(expanded)
    return hosts


def _split_top_level_commas(s: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"malformed Slurm host list {s!r}")
        if ch == "," and depth == 0:
            names.append(s[start:i].strip())
            start = i + 1
    if depth != 0:
        raise ValueError(f"malformed Slurm host list {s!r}")
    names.append(s[start:].strip())
    return names


def _expand_bracket(body: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"malformed Slurm host list {whole!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"malformed Slurm host list {whole!r}: descending range {item!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def world_size_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """The world size the launcher promises, read before any process group exists."""
    return DistEnv.from_environ(environ).world_size


def init_distributed(env: DistEnv, backend: str | None = None, timeout_s: float = 1800, socket_ifname: str | None = None) -> None:
    """Create the default process group for ``env``; a no-op when one already exists.
    ``socket_ifname`` (launch.socket_ifname) pins gloo's and NCCL's traffic to those interfaces."""
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise DistEnvError(f"a process group of size {dist.get_world_size()} already exists, the environment says {env.world_size}")
        return
    if socket_ifname:
        os.environ.update(GLOO_SOCKET_IFNAME=socket_ifname, NCCL_SOCKET_IFNAME=socket_ifname)
    # DeepSpeed reads these rather than asking torch.distributed.
    os.environ.update(
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
    )
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1:
        # No peer has to find us, so skip the TCP store: concurrent single-process runs on one
        # machine would otherwise fight over the default port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout)
    host, interfaces = socket.gethostname(), os.environ.get("GLOO_SOCKET_IFNAME")
    logger.info("process group ready: rank %d/%d on %s backend %s master %s:%d%s", env.rank, env.world_size, host, backend,
                env.master_addr, env.master_port, f" via {interfaces}" if interfaces else "")


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def computed_on_rank_zero(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone and its result sent to every rank: work that is the same for
    all ranks but costly or rude to repeat on each (reading a dataset's index over the network).
    When it raises, every rank raises: a ValueError as itself, anything else as a RuntimeError
    naming it (rank 0 re-raises the original), so no rank is left waiting. Without a process
    group each caller runs ``fn`` itself."""
    if get_world_size() == 1:
        return fn()
    outcome: list = [None]
    failure: BaseException | None = None
    if get_rank() == 0:
        try:
            outcome[0] = (True, fn())
        except Exception as error:  # every kind must reach the other ranks
            failure = error
            shared = error if isinstance(error, ValueError) else RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
            outcome[0] = (False, shared)
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if failure is not None:
        raise failure
    if not ok:
        raise value
    return value


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over ranks and return it; the identity without a process group."""
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# torch >= 2.10 renamed all_gather_into_tensor (and warns on the old name).
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [b, ...] tensor along dim 0, keeping the autograd graph.

    Each rank's slice feeds the loss on every rank, so the gradient of a slice is the sum over
    ranks of the gradient each rank's loss puts on it: all_reduce(SUM) of the full gradient,
    then take our slice. (reduce_scatter would move half the bytes, but gloo lacks it.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.rank, ctx.local_size = group, rank, x.shape[0]
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _all_gather_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size], None


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[b, ...] on each rank -> [world_size * b, ...] in rank order; the backward sums over ranks.

    Every rank must pass the same b. At world size 1 (or without a group) this is the identity.
    """
    world_size = get_world_size(group)
    if world_size == 1:
        return x
    # Ranks with different b would silently misalign the rank-major slices; one tiny collective
    # per call buys a clear error instead.
    sizes = torch.empty(world_size, dtype=torch.long, device=x.device)
    _all_gather_tensor(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    local_sizes = sizes.tolist()
    if len(set(local_sizes)) != 1:
        raise ValueError(f"all_gather_with_grad needs the same local batch on every rank, got sizes {local_sizes}")
    return _AllGatherWithGrad.apply(x, group)
