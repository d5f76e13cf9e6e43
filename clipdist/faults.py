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
- **Ranks outliving their launcher** (``die_with_launcher``): a rank started by torchrun, the
  DeepSpeed launcher or srun (slurmstepd) asks the kernel to SIGKILL it, and its DataLoader
  workers, when that parent dies, so a SIGKILLed launcher leaves no rank training on.
- **Non-finite losses** (``NonFiniteLoss``, ``agree_loss_is_finite``): a step whose loss is
  NaN/inf on any rank is skipped on every rank before its backward, so no update is poisoned.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from clipdist.distributed import DistEnv, all_reduce_sum, get_rank

log = logging.getLogger(__name__)

# SIGUSR2: what Hydra's submitit launcher sends before the time limit (clipdist.sweep).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# The exit status of a rank that stops because a peer is dead or hung (distinct from 1, a
# rank's own error, so that a job script can tell them apart).
PEER_FAULT_EXIT = 3
# This process's parent when clipdist was imported, before any of its own work: the launcher that
# started it, unless that had died already (``die_with_launcher`` checks).
_PARENT_AT_START = os.getppid()


# ---------------------------------------------------------------------------------------------
# Preemption


class StopSignals:
    """Turns SIGUSR1/SIGTERM into a request to stop at the next step boundary."""

    def __init__(self, signals: Tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[str] = None
        self._previous: Dict[signal.Signals, object] = {}
        self._exiting = False
        # Python runs a signal's handler only once the main thread is back in Python code; a rank
        # blocked in a collective with a dead peer never is. The C-level handler also writes the
        # signal's number into this pipe at once, for the watchdog thread (Watchdog.watch).
        self.wakeup_fd: Optional[int] = None
        self._wakeup_write: Optional[int] = None
        self._previous_wakeup: Optional[int] = None

    def __enter__(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if self._previous_wakeup is None:  # the outer `with`: exiting() enters again
            if self.wakeup_fd is None:
                self.wakeup_fd, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous_wakeup is not None and not self._exiting:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._previous_wakeup = None

    def arrived(self) -> List[str]:
        """The stop signals that reached this process since the last call (any thread may ask),
        whether or not their Python handler has run yet."""
        try:
            numbers = os.read(self.wakeup_fd, 1024) if self.wakeup_fd is not None else b""
        except BlockingIOError:
            numbers = b""
        return [signal.Signals(n).name for n in numbers if n in {int(sig) for sig in self.signals}]

    @contextlib.contextmanager
    def exiting(self):
        """For a rank that exits anyway, while it finds out why: a stop signal is only recorded,
        where the default action would end the process before its line (torchrun SIGTERMs the
        ranks that survive a dead one)."""
        self._exiting = True
        try:
            with self:
                yield self
        finally:
            self._exiting = False

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        first = self.received is None
        self.received = self.received or name
        if self._exiting:
            return
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
        # At most 2 s: a survivor names the dead after 2.5 intervals, and must print its line
        # before a launcher's kill follows its SIGTERM (Slurm's KillWait may be 10 s or less).
        self.interval_s = max(0.5, min(2.0, timeout_s / 8))
        self._store_addr, self._store_port = store_addr, store_port
        self._store_timeout_s = max(2.0, self.interval_s)
        self._store = None
        self._count, self._what = 0, "start"
        self._last_progress = time.monotonic()
        self._beats = 0
        self._stop = threading.Event()
        self._signals: Optional[StopSignals] = None
        self._thread = threading.Thread(target=self._run, name="clipdist-watchdog", daemon=True)

    @classmethod
    def for_env(cls, timeout_s: float, env: DistEnv) -> Watchdog:
        """Heartbeats through the launcher's rendezvous store (MASTER_ADDR:MASTER_PORT)."""
        return cls(timeout_s, env.rank, env.world_size, env.master_addr, env.master_port)

    def start(self) -> Watchdog:
        if self.world_size > 1:
            self._thread.start()
        return self

    def watch(self, signals: StopSignals) -> None:
        """Also answer stop signals that the main thread cannot: see _answer_signal."""
        self._signals = signals

    def stop(self) -> None:
        """End the heartbeats and wait for the thread. A daemon thread still inside a store call
        when Python exits aborts the whole process ("terminate called without an active
        exception", SIGABRT): a finished run would fail at its very end."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self._store_timeout_s + 1)  # a beat: connect, then set

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
                timeout=datetime.timedelta(seconds=self._store_timeout_s),
                wait_for_workers=False,
            )
        return self._store

    def _run(self) -> None:
        self._beat()  # at once: a rank that dies before its first interval is still placed on its host
        while not self._wait_for_beat_or_signal():
            self._beat()
            for name in self._signals.arrived() if self._signals is not None else ():
                self._answer_signal(name)
            stalled = time.monotonic() - self._last_progress
            if stalled > self.timeout_s and not self._stop.is_set():
                self._abort(f"no progress for {stalled:.0f} s (train.fault_timeout_s={self.timeout_s:g}) after {self._what}: {self.blame()}")
        self._store = None  # its connection closes here, not at interpreter exit

    def _wait_for_beat_or_signal(self) -> bool:
        """Sleep one interval, or less when a stop signal arrives; True once stop() was called."""
        if self._signals is not None and self._signals.wakeup_fd is not None:
            select.select([self._signals.wakeup_fd], [], [], self.interval_s)
        else:
            self._stop.wait(self.interval_s)
        return self._stop.is_set()

    def _answer_signal(self, name: str) -> None:
        """A stop signal whose Python handler has not run a moment later: the main thread is
        blocked in native code, typically a collective. If peers are dead it will never return
        (gloo's own timeout is 30 min), and a launcher's SIGKILL follows its SIGTERM within
        seconds (Slurm's KillWait): say now which peers are to blame, and exit."""
        deadline = time.monotonic() + 1.0
        while self._signals.received is None and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.05)
        if self._signals.received is not None or self._stop.is_set():
            return  # the main thread answers it at the next step boundary
        try:
            looked = self._look()
        except Exception as error:
            peers = self._store_gone(error)
        else:
            if not looked[0]:
                return  # every peer beats: a slow collective, not a dead one
            peers = self._describe(*looked)
        if not self._stop.is_set():  # else the main thread found the fault itself (explain)
            self._abort(f"blocked in a collective when {name} arrived; peers: {peers}")

    def _beat(self) -> None:
        self._beats += 1
        try:
            self._publish({"beats": self._beats, "progress": self._count, "what": self._what})
        except Exception:  # the store's host may be gone; blame() reports it
            self._store = None

    def _publish(self, entry: dict, connect: bool = True) -> None:
        store = self._connect() if connect else self._store
        if store is not None:
            store.set(self._key(self.rank), json.dumps({**entry, "host": socket.gethostname(), "pid": os.getpid()}))

    def _key(self, rank: int) -> str:
        return f"clipdist/heartbeat/{rank}"

    def _read(self) -> Dict[int, dict]:
        store = self._connect()
        entries = {}
        for rank in range(self.world_size):
            if rank != self.rank and store.check([self._key(rank)]):
                entries[rank] = json.loads(store.get(self._key(rank)))
        return entries

    def _look(self) -> Tuple[List[int], List[int], Dict[int, dict], Dict[int, dict]]:
        """(silent peers, peers behind, the two looks at the heartbeats): a few beats apart."""
        before = self._read()
        self._wait_beating(2.5 * self.interval_s)
        after = self._read()
        peers = [r for r in range(self.world_size) if r != self.rank and "left" not in after.get(r, {})]
        silent = [r for r in peers if r not in after or after[r]["beats"] == before.get(r, {}).get("beats")]
        behind = [r for r in peers if r in after and r not in silent and after[r]["progress"] < self._count]
        return silent, behind, before, after

    def _wait_beating(self, seconds: float) -> None:
        """Sleep; the watchdog thread beats on meanwhile, so that peers looking at the same
        moment (all blocked in one slow collective when a signal came) see it alive."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, self.interval_s))
            if threading.current_thread() is self._thread:
                self._beat()

    def blame(self) -> str:
        """Which peers are dead, frozen or behind: two looks at their heartbeats, a few beats apart.
        Peers that announced their own exit (``explain``) are survivors, not culprits."""
        try:
            return self._describe(*self._look())
        except Exception as error:
            return self._store_gone(error)

    def _store_gone(self, error: Exception) -> str:
        self._store = None
        return (
            f"the rendezvous store at {self._store_addr}:{self._store_port} is unreachable ({type(error).__name__}): "
            "rank 0, or the launcher hosting it, is dead"
        )

    def _describe(self, silent: List[int], behind: List[int], before: Dict[int, dict], after: Dict[int, dict]) -> str:
        parts = []
        if silent:
            parts.append(f"rank(s) {silent} stopped sending heartbeats (dead, frozen or unreachable; {_hosts_of(silent, {**before, **after})})")
        if behind:
            parts.append(", ".join(f"rank {r} is alive but behind, at '{after[r]['what']}'" for r in behind))
        return "; ".join(parts) or f"every rank is alive and at this rank's progress; a collective is stuck (this rank at '{self._what}')"

    def explain(self, error: BaseException, stop: Optional[StopSignals] = None) -> str:
        """Log, and return, the one line for a rank whose collective (or loader) broke because a
        peer died: what broke here and which peers are to blame. Called by the main thread, which
        then exits with PEER_FAULT_EXIT. The heartbeats go on meanwhile (a survivor is not a
        culprit); then the entry says this rank left, for the peers still looking."""
        ignore_loader_deaths()  # a DataLoader worker's death would raise again inside the sleep below
        self._last_progress = time.monotonic()  # the thread must not abort while the main thread looks
        with stop.exiting() if stop is not None else contextlib.nullcontext():
            peers = self.blame()
            peer = peer_error(error)
            what = f"a collective failed ({_first_line(peer)})" if peer else f"this rank was stopped ({_first_line(error)})"
            if stop is not None and stop.received:
                what += f" after {stop.received}"
            line = f"clipdist: rank {self.rank}: peer fault: {what}; peers: {peers}; exiting with status {PEER_FAULT_EXIT}"
            self._leave()
            log.error(line)
        return line

    def _leave(self) -> None:
        """Stop beating, and say so in this rank's entry: peers still looking see a rank that
        left, not a dead one."""
        self.stop()  # waits for the thread: its last beat must not overwrite the entry below
        try:  # over the connection that worked, if any: a gone store must not delay the exit
            self._publish({"beats": self._beats, "progress": self._count, "what": self._what, "left": "peer fault"}, connect=False)
        except Exception:
            pass

    def _abort(self, message: str) -> None:
        line = f"clipdist: rank {self.rank}: peer fault: {message}; exiting with status {PEER_FAULT_EXIT}"
        self._leave()
        log.error(line)  # logging flushes each record, so the line survives os._exit
        # The main thread is blocked in a collective that will not return: only _exit ends it.
        os._exit(PEER_FAULT_EXIT)


def _hosts_of(ranks: List[int], entries: Dict[int, dict]) -> str:
    """Where ``ranks`` ran, from their last heartbeats: "on node2", or "on node1 [1], node2 [3]"."""
    by_host: Dict[str, List[int]] = {}
    for rank in ranks:
        by_host.setdefault(entries.get(rank, {}).get("host", "an unknown host (no heartbeat)"), []).append(rank)
    if len(by_host) == 1:
        return f"on {next(iter(by_host))}"
    return "on " + ", ".join(f"{host} {members}" for host, members in by_host.items())


def _first_line(error: BaseException) -> str:
    """``error`` in one line: its first sentence (gloo goes on with advice)."""
    text = " ".join(str(error).split()).split(". ")[0].rstrip(". ") or "no message"
    return f"{type(error).__name__}: {text[:300]}"


class PeerFault(RuntimeError):
    """This rank stops because a peer died or hung; the message is the one line to print (no
    traceback: the fault is not here). Exit with PEER_FAULT_EXIT."""


_PEER_FAILURE_TEXT = ("gloo", "NCCL", "Connection closed by peer", "Connection reset")


def _chain(error: BaseException):
    """``error`` and the exceptions it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def peer_error(error: BaseException) -> Optional[BaseException]:
    """The exception in ``error``'s chain that came out of a collective or the store, as when a
    peer dies (gloo raises a plain RuntimeError naming itself), or None. Its own chain counts:
    a DataLoader worker killed by the launcher's SIGTERM may raise inside the handling of the
    collective's error."""
    for link in _chain(error):
        if isinstance(link, dist.DistError) or any(s in str(link) for s in _PEER_FAILURE_TEXT):
            return link
    return None


def is_peer_failure(error: BaseException) -> bool:
    return peer_error(error) is not None


def is_loader_worker_death(error: BaseException) -> bool:
    """A DataLoader worker died (as when a launcher SIGTERMs a rank's whole process group)."""
    return any("DataLoader worker (pid" in str(link) for link in _chain(error))


def ignore_loader_deaths() -> None:
    """Stop the DataLoader's SIGCHLD handler from raising "worker killed" errors in the main
    thread at arbitrary points (a failing rank no longer wants its workers)."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass


# ---------------------------------------------------------------------------------------------
# Dying with the launcher

PR_SET_PDEATHSIG = 1


def launcher_parent(environ: Mapping[str, str] = os.environ, parent: Optional[int] = None) -> Optional[str]:
    """The launcher that started this process and owns its lifetime, by what the environment
    and the parent say: torchrun (its agent), the DeepSpeed launcher, or srun (slurmstepd is
    the parent of each task). None for a process started from a shell, a test or a notebook:
    ``nohup python -m clipdist.train &`` must outlive its shell."""
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    if "CROSS_RANK" in environ and "LOCAL_SIZE" in environ:
        return "the DeepSpeed launcher"
    if _process_name(_PARENT_AT_START if parent is None else parent) == "slurmstepd":
        return "srun"
    return None


def _process_name(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _is_the_launcher(pid: int, launcher: str) -> bool:
    """Whether ``pid`` can be ``launcher`` rather than the init or subreaper (systemd, tini, a
    shell) that adopted this process after the launcher died. torchrun's agent and the DeepSpeed
    launcher are Python processes (in a container, perhaps PID 1 itself); init is not."""
    if launcher == "srun":
        return _process_name(pid) == "slurmstepd"
    try:
        name = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:  # another user's process (init, as a rule): its name is still readable
        name = _process_name(pid)
    return name is None or name.startswith("python") or name in ("torchrun", "deepspeed", "accelerate")


def die_with_launcher(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Under a launcher, have the kernel SIGKILL this process when the launcher dies
    (PR_SET_PDEATHSIG), and its DataLoader workers when it dies. A launcher that exits normally
    has ended its ranks first; one that is SIGKILLed (or crashes) would otherwise leave them
    training with nobody to collect them. Returns None, or, when the launcher died before this
    call (the parent is no longer the one that started this process), the one-line reason to
    exit at once."""
    parent = _PARENT_AT_START
    launcher = launcher_parent(environ, parent)
    if launcher is None or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("clipdist: prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank will not die with %s", ctypes.get_errno(), launcher)
        return None
    # The death signal only covers a parent alive now: if the launcher died before the prctl,
    # this process was adopted already.
    if os.getppid() != parent or not _is_the_launcher(parent, launcher):
        return f"{launcher}, which started this process (parent pid {parent}), is gone"
    global _children_die_with_this_process
    if not _children_die_with_this_process:
        os.register_at_fork(before=_before_fork, after_in_child=_die_with_forking_thread)
        _children_die_with_this_process = True
    return None


_children_die_with_this_process = False
_forking_from_main_thread = False


def _before_fork() -> None:
    global _forking_from_main_thread
    _forking_from_main_thread = threading.current_thread() is threading.main_thread()


def _die_with_forking_thread() -> None:
    """In a child forked by this rank (a DataLoader worker): SIGKILL when the rank dies. The
    signal follows the forking thread, so only children of the main thread get it (a thread
    that ends before the rank would otherwise take its children with it)."""
    if _forking_from_main_thread:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
