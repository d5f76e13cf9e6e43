"""Metrics: wandb (offline by default), a local metrics.jsonl, run_info.json and progress lines — rank 0 only.

Every row is plotted against ``train/samples_seen`` (wandb's x axis and the report's), so runs
with different global batches compare on one axis. Nothing secret reaches wandb or the run
directory: config values, the command line and the run info pass through ``redact`` first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import clipdist
from clipdist.config import LoggingConfig
from clipdist.fileio import write_text_atomically

log = logging.getLogger("clipdist")

SAMPLES_SEEN = "train/samples_seen"
REDACTED = "***"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the clipdist checkout, when it is one


def setup_console_logging(rank: int) -> None:
    """Clean progress lines from rank 0; other ranks say where they run, then, like other libraries,
    speak only for warnings."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Every rank says where it runs ("process group ready: rank R/N on HOST ..."), one line each.
    logging.getLogger("clipdist.distributed").setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------
# Secrets

# A name whose last word says it holds a credential: WANDB_API_KEY, AWS_SECRET_ACCESS_KEY,
# AWS_ACCESS_KEY_ID, HF_TOKEN, DB_PASSWORD, X-Amz-Signature, Azure SAS `sig`. `record_keys` or
# `monkey` do not match: the word must stand alone at the end of the name.
_SECRET_NAME = re.compile(
    r"(?:^|[_.\-])(?:key|key_?id|token|secret|password|passwd|credentials?|signature|sig|auth)$", re.IGNORECASE
)
# scheme://user:password@host — the whole user info goes, since a bare user part is often a token.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]+@")
# NAME=value (environment assignments in pipe: commands, URL query parameters, overrides).
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z0-9_.\-]+)(?P<sep>=)(?P<value>[^\s&'\"]+)")
# --token VALUE, --password=VALUE, curl's -u user:password, and HTTP Authorization headers.
_FLAG = re.compile(r"(?P<flag>--?[A-Za-z0-9\-]*(?:token|password|secret|api-?key)[ =]|--user[ =]|(?<!\S)-u (?=[^\s:'\"]+:))(?P<value>[^\s'\"]+)", re.IGNORECASE)
_HEADER = re.compile(r"(?P<head>\bauthorization:\s*(?:[A-Za-z]+\s+)?|\bbearer\s+)(?P<value>[^\s'\"]+)", re.IGNORECASE)
# Values of secret environment variables shorter than this are not searched for in text:
# replacing every "1" or "true" would mangle the config and protect nothing.
_MIN_ENV_SECRET_LENGTH = 8


def looks_secret(name: str) -> bool:
    """Whether a config key or environment variable name says its value is a credential."""
    return bool(_SECRET_NAME.search(name))


def _secret_env_values() -> list[str]:
    values = {v for k, v in os.environ.items() if looks_secret(k) and len(v) >= _MIN_ENV_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: one secret may contain another


def redact(text: str) -> str:
    """``text`` with URL credentials, NAME=value secrets, token flags and headers, and the values
    of secret-looking environment variables (``${oc.env:HF_TOKEN}`` resolves into the config)
    replaced by ``***``."""
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _ASSIGNMENT.sub(lambda m: f"{m['name']}={REDACTED}" if looks_secret(m["name"]) else m[0], text)
    text = _FLAG.sub(lambda m: f"{m['flag']}{REDACTED}", text)
    return _HEADER.sub(lambda m: f"{m['head']}{REDACTED}", text)


def redact_config(value: Any, name: str = "") -> Any:
    """A copy of a (nested) config with secrets redacted: whole values under secret-looking keys,
    and the secret parts of every string."""
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_config(v, name) for v in value]
    if looks_secret(name) and value not in (None, ""):
        return REDACTED
    return redact(value) if isinstance(value, str) else value


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """wandb records sys.argv (our Hydra overrides) in the run's metadata when it starts."""
    original = sys.argv
    sys.argv = [redact(arg) for arg in original]
    try:
        yield
    finally:
        sys.argv = original


# ---------------------------------------------------------------------------------------------
# Run info


def git_state(root: Path = PACKAGE_ROOT) -> Optional[Dict[str, Any]]:
    """Commit and dirty flag (tracked files changed) of the git checkout at ``root``; None when
    ``root`` is not the top of a checkout (an installed package) or git is absent."""

    def git(*args: str) -> str:
        command = ["git", "--no-optional-locks", "-C", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        # A site-packages inside some other repository is not a clipdist checkout.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {"python": sys.version.split()[0], "clipdist": clipdist.__version__}
    for package in ("torch", "deepspeed", "wandb"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def launch_info(world_size: int, resumed_from: Optional[str]) -> Dict[str, Any]:
    """What identifies this launch beside its config: code version, world size, command line."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": world_size,
        "git": git_state(),
        "resumed_from": resumed_from,
        "argv": [redact(arg) for arg in sys.argv],
        "versions": _versions(),
    }


def write_run_info(run_dir: Path, info: Dict[str, Any], config: Dict[str, Any], resuming: bool) -> None:
    """<run>/run_info.json: this launch and its redacted config; a resumed run keeps the earlier
    launches (perhaps of other commits) under "previous_launches"."""
    path = run_dir / "run_info.json"
    previous: list = []
    if resuming and path.exists():
        with contextlib.suppress(ValueError, OSError):
            earlier = json.loads(path.read_text())
            previous = earlier.pop("previous_launches", []) + [earlier]
    content = {**info, "config": config, "previous_launches": previous}
    write_text_atomically(path, json.dumps(content, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The logger


class MetricLogger:
    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        config: Dict[str, Any],
        rank: int,
        resuming: bool = False,
        world_size: int = 1,
        resumed_from: Optional[str] = None,
    ):
        self.cfg = cfg
        self.enabled = rank == 0
        self.run = None
        self.metrics_file = None
        self.samples_seen: Optional[int] = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        safe_config = redact_config(config)
        info = launch_info(world_size, redacted_or_none(resumed_from))
        write_run_info(run_dir, info, safe_config, resuming)
        # A resumed run continues the metrics of the run it resumes; a new run starts them afresh.
        self.metrics_file = open(run_dir / "metrics.jsonl", "a" if resuming else "w")
        if cfg.wandb_mode != "disabled":
            run_info = {k: info[k] for k in ("world_size", "git", "versions", "resumed_from")}
            self.run = self._start_wandb(run_dir, {**safe_config, "run_info": run_info}, resuming)

    def _start_wandb(self, run_dir: Path, config: Dict[str, Any], resuming: bool):
        """The wandb run: online when asked and possible, else offline. An online run that cannot
        start (no API key, no server within logging.wandb_init_timeout_s) costs one warning line,
        never the training run."""
        import wandb

        # Keep wandb quiet on the console; its files still land in run_dir/wandb.
        os.environ.setdefault("WANDB_SILENT", "true")
        # No reports of wandb's own errors to the wandb server: where it does not answer, sending
        # them held the process about 20 s at exit (and its errors may quote URLs).
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        # A resumed launch (a requeued Slurm job) continues the same wandb run.
        run_id = wandb_run_id(run_dir, resuming)
        if self.cfg.wandb_mode != "online":
            return self._init_wandb_run(wandb, self.cfg.wandb_mode, run_id, run_dir, config)
        problem = online_wandb_problem(wandb)
        if problem is None:
            try:
                return self._init_wandb_run(wandb, "online", run_id, run_dir, config)
            # wandb raises its own errors (UsageError, CommError ...), TimeoutError past its grace
            # period, OSError from its service process. Should the offline start below fail as
            # well, that error stops the run: it is not the network's.
            except Exception as error:
                bound = f"logging.wandb_init_timeout_s={self.cfg.wandb_init_timeout_s:g}"
                problem = f"{type(error).__name__} within {bound}: {first_line(error)}"
                # wandb's service process keeps the failed run's id reserved; a fresh one lets
                # the offline run keep the id (and a later `wandb sync` the same online run).
                wandb.teardown()
        run = self._init_wandb_run(wandb, "offline", run_id, run_dir, config)
        log.warning("wandb: no online run (%s); logging offline instead, upload later with: wandb sync %s", problem, run.sync_dir)
        return run

    def _init_wandb_run(self, wandb, mode: str, run_id: str, run_dir: Path, config: Dict[str, Any]):
        settings = wandb.Settings(
            # Our run_info holds the commit; wandb's git capture would also record the remote
            # URL, which in CI checkouts often embeds a token.
            disable_git=True,
            # No copy of stdout/stderr: error messages quote shard URLs and commands verbatim.
            # The job's own log (torchrun's console, Slurm's output file) has every line.
            console="off",
            # wandb's default is 90 s, during which every rank waits for rank 0.
            init_timeout=self.cfg.wandb_init_timeout_s,
        )
        with redacted_argv():
            run = wandb.init(
                id=run_id,
                resume="allow",
                project=redact(self.cfg.project),
                name=redact(self.cfg.run_name),
                mode=mode,
                dir=str(run_dir),
                config=config,
                settings=settings,
                reinit="finish_previous",
            )
        # Dashboards plot every metric against samples seen, not wandb's internal step.
        run.define_metric(SAMPLES_SEEN)
        run.define_metric("*", step_metric=SAMPLES_SEEN)
        return run

    def log(self, metrics: Dict[str, float], step: int, samples_seen: Optional[int] = None) -> None:
        """One row at optimizer step ``step``. Every row carries train/samples_seen: given here,
        in ``metrics``, or (eval rows) the last value logged."""
        if not self.enabled or not metrics:
            return
        row = {**metrics, SAMPLES_SEEN: self._samples_seen_for(metrics, samples_seen, step)}
        self.metrics_file.write(json.dumps({"step": step, **row}) + "\n")
        self.metrics_file.flush()
        if self.run is not None:
            self.run.log(row, step=step)

    def _samples_seen_for(self, metrics: Dict[str, float], samples_seen: Optional[int], step: int) -> int:
        if samples_seen is None:
            samples_seen = metrics.get(SAMPLES_SEEN, self.samples_seen)
        if samples_seen is None:
            raise ValueError(f"MetricLogger.log: step {step}: no {SAMPLES_SEEN} logged yet; pass samples_seen")
        self.samples_seen = int(samples_seen)
        return self.samples_seen

    def progress(self, step: int, max_steps: int, metrics: Dict[str, float]) -> None:
        """One console line: train/ and perf/ metrics, and the data/ counts as one number."""
        quiet = {SAMPLES_SEEN, *(k for k in ("train/nonfinite_steps",) if not metrics.get(k))}  # shown only when non-zero
        shown = [f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items() if not k.startswith("data/") and k not in quiet]
        if "data/epoch" in metrics:
            shown.append(f"epoch {metrics['data/epoch']:.0f}")
        if "data/skipped/padded" in metrics:
            shown.append(f"rows replaced {metrics['data/skipped/padded']:.0f}")
        log.info("step %*d/%d  %s", len(str(max_steps)), step, max_steps, "  ".join(shown))

    def summary(self, values: Dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in redact_config(values).items():
                self.run.summary[key] = value

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.run is not None:
            offline, sync_dir = self.run.offline, self.run.sync_dir
            self.run.finish()
            if offline:
                log.info("wandb: offline run in %s; upload it with: wandb sync %s", sync_dir, sync_dir)


def online_wandb_problem(wandb) -> Optional[str]:
    """Why an online run cannot start, as far as can be told without the network: None when
    wandb finds credentials (WANDB_API_KEY, a netrc file, an identity token ...). Never asks
    for a key: without a terminal wandb.init would raise, with one (an interactive torchrun)
    it would wait at a prompt while the other ranks wait for this one, and save the key."""
    if wandb.login(prompt=False, verify=False):
        return None
    return "no API key: set WANDB_API_KEY or run `wandb login`"


def first_line(error: BaseException) -> str:
    """The first line of an error's message, secrets redacted (wandb's errors add advice on
    further lines, in terms of its own settings)."""
    lines = str(error).strip().splitlines()
    return redact(lines[0]) if lines else ""


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The run's wandb id, kept in <run>/wandb_run_id: a new one for a new run, the same one when
    resuming."""
    path = run_dir / "wandb_run_id"
    if resuming and path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    write_text_atomically(path, run_id)
    return run_id


def redacted_or_none(text: Optional[str]) -> Optional[str]:
    return None if text is None else redact(text)
