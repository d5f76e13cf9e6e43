"""What a run does when the cluster or the numbers turn against it.

- **Preemption** (``StopSignals``): Slurm announces the end of an allocation with SIGUSR1
  (``--signal=USR1@120``) and ends it with SIGTERM (scancel, preemption grace time over,
  ``scontrol requeue``). A handler only sets a flag; at every step boundary the ranks agree
  collectively whether any of them got one, so all stop after the same step, checkpoint, and
  (rank 0) requeue the job (``requeue_slurm_job``). The requeued job resumes by itself
  (``train.resume=auto``).
- **Dead or hung ranks** (``Watchdog``): a thread per rank publishes heartbeats to the
  rendezvous store and exits the process, naming the culprit, once its own rank has made no
  progress for ``train.fault_timeout_s``; a rank blocked in a collective with a dead or stuck
  peer would otherwise wait for the process group's timeout (30 min) or forever.
- **Non-finite losses** (``NonFiniteLoss``, ``agree_loss_is_finite``): a step whose loss is
  NaN/inf on any rank is skipped on every rank before its backward, so no update is poisoned.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from clipdist.distributed import DistEnv, all_reduce_sum, get_rank

log = logging.getLogger(__name__)

# SIGUSR2: what Hydra's submitit launcher sends before the time limit (clipdist.sweep).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# The exit status of a rank that stops because a peer is dead or hung (distinct from 1, a
# rank's own error, so that a job script can tell them apart).
PEER_FAULT_EXIT = 3


# ---------------------------------------------------------------------------------------------
# Preemption


class StopSignals:
    """Turns SIGUSR1/SIGTERM into a request to stop at the next step boundary."""

    def __init__(self, signals: Tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[str] = None
        self._previous: Dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        first = self.received is None
        self.received = self.received or name
        # No logging here: the handler may interrupt the logging module while it holds its lock.
        what = "stopping at the next step boundary" if first else "already stopping"
        os.write(2, f"clipdist: rank {get_rank()}: received {name}; {what}\n".encode())

    def agreed(self, device: torch.device) -> int:
        """Collective: how many ranks have received a stop signal (0: keep training)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        return int(all_reduce_sum(flag).item())


def requeue_slurm_job(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """``scontrol requeue`` this job when under Slurm (rank 0, after the checkpoint is complete).

    Returns what happened, for the log. Slurm then sends SIGTERM to every process of the job, and
    SIGKILL after its KillWait, so the caller should exit promptly."""
    if "SLURM_ARRAY_JOB_ID" in environ:  # an array task is requeued by its own id, not the array's
        job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ.get('SLURM_ARRAY_TASK_ID')}"
    else:
        job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"scontrol requeue {job} failed: {error}"
    if done.returncode != 0:
        return f"scontrol requeue {job} failed: {done.stderr.strip() or done.returncode}"
    return f"requeued Slurm job {job}"


# ---------------------------------------------------------------------------------------------
# Non-finite losses


class NonFiniteLoss(ArithmeticError):
    """This step's loss is NaN/inf on the ranks named; every rank skips the step."""

    def __init__(self, bad_ranks: list):
        super().__init__(f"non-finite loss on rank(s) {bad_ranks}")
        self.bad_ranks = bad_ranks


def agree_loss_is_finite(loss: torch.Tensor) -> None:
    """Collective: raise NonFiniteLoss on every rank when any rank's loss is NaN/inf.

    Before the backward: a NaN gradient all-reduced into every rank's buffers would poison the
    update everywhere, and skipping on one rank alone would desynchronise the collectives."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    bad = torch.zeros(world, device=loss.device)
    bad[get_rank()] = float(not torch.isfinite(loss.detach()).all())
    bad_ranks = [rank for rank, flag in enumerate(all_reduce_sum(bad).tolist()) if flag]
    if bad_ranks:
        raise NonFiniteLoss(bad_ranks)


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason the message gives in one line (not a bug: no traceback)."""


# ---------------------------------------------------------------------------------------------
# Dead and hung ranks


class Watchdog:
    """Exits this rank, naming the culprit, when it makes no progress for ``timeout_s``.

    The main thread calls ``progress()`` at every step (and around checkpoints and eval). A
    daemon thread publishes ``(beats, progress count)`` under ``clipdist/heartbeat/<rank>`` in
    the rendezvous store every few seconds, over a connection of its own (the store keeps
    answering while this rank's main thread is blocked in a collective). When this rank's
    progress stalls, the peers' entries tell which rank is to blame: one whose beats stopped is
    dead or frozen; one whose beats go on at a lower progress count is hung in its own code.
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int, store_addr: str, store_port: int):
        self.timeout_s = timeout_s
        self.rank, self.world_size = rank, world_size
        self.interval_s = max(0.5, min(5.0, timeout_s / 8))
        self._store_addr, self._store_port = store_addr, store_port
        self._store = None
        self._count, self._what = 0, "start"
        self._last_progress = time.monotonic()
        self._beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipdist-watchdog", daemon=True)

    @classmethod
    def for_env(cls, timeout_s: float, env: DistEnv) -> Watchdog:
        """Heartbeats through the launcher's rendezvous store (MASTER_ADDR:MASTER_PORT)."""
        return cls(timeout_s, env.rank, env.world_size, env.master_addr, env.master_port)

    def start(self) -> Watchdog:
        if self.world_size > 1:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def progress(self, what: str) -> None:
        self._count += 1
        self._what = what
        self._last_progress = time.monotonic()

    def _connect(self):
        if self._store is None:
            self._store = dist.TCPStore(
                self._store_addr,
                self._store_port,
                is_master=False,
                timeout=datetime.timedelta(seconds=max(2.0, self.interval_s)),
                wait_for_workers=False,
            )
        return self._store

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()
            stalled = time.monotonic() - self._last_progress
            if stalled > self.timeout_s and not self._stop.is_set():
                self._abort(f"no progress for {stalled:.0f} s (train.fault_timeout_s={self.timeout_s:g}) after {self._what}: {self.blame()}")

    def _beat(self) -> None:
        self._beats += 1
        try:
            entry = {"beats": self._beats, "progress": self._count, "what": self._what}
            self._connect().set(self._key(self.rank), json.dumps(entry))
        except Exception:  # the store's host may be gone; blame() reports it
            self._store = None

    def _key(self, rank: int) -> str:
        return f"clipdist/heartbeat/{rank}"

    def _read(self) -> Dict[int, dict]:
        store = self._connect()
        entries = {}
        for rank in range(self.world_size):
            if rank != self.rank and store.check([self._key(rank)]):
                entries[rank] = json.loads(store.get(self._key(rank)))
        return entries

    def blame(self) -> str:
        """Which peers are dead, frozen or behind: two looks at their heartbeats, a few beats apart."""
        try:
            before = self._read()
            time.sleep(2.5 * self.interval_s)
            after = self._read()
        except Exception as error:
            return (
                f"the rendezvous store at {self._store_addr}:{self._store_port} is unreachable ({type(error).__name__}): "
                "rank 0, or the launcher hosting it, is dead"
            )
        silent = [r for r in range(self.world_size) if r != self.rank and (r not in after or after[r]["beats"] == before.get(r, {}).get("beats"))]
        behind = [r for r, entry in after.items() if r not in silent and entry["progress"] < self._count]
        parts = []
        if silent:
            parts.append(f"rank(s) {silent} stopped sending heartbeats (dead, frozen or unreachable)")
        if behind:
            parts.append(", ".join(f"rank {r} is alive but behind, at '{after[r]['what']}'" for r in behind))
        return "; ".join(parts) or f"every rank is alive and at this rank's progress; a collective is stuck (this rank at '{self._what}')"

    def _abort(self, message: str) -> None:
        line = f"clipdist: rank {self.rank}: peer fault: {message}; exiting with status {PEER_FAULT_EXIT}"
        log.error(line)  # logging flushes each record, so the line survives os._exit
        # The main thread is blocked in a collective that will not return: only _exit ends it.
        os._exit(PEER_FAULT_EXIT)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` came out of a collective or the store, as when a peer dies (gloo raises
    a plain RuntimeError naming itself)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection closed by peer", "Connection reset"))
