"""Time from launch to the first optimizer step when the training data is 100,000 shard URLs on an
HTTP server, beside the same launch over the 4 real shards those URLs stand for.

    python benchmarks/startup.py              # about 2 minutes on 2 cores (4 rounds + 1 traced)

Both cases launch exactly what a user would, on the CPU:

    torchrun --standalone --nproc_per_node 2 -m clipdist.train +experiment=tiny \\
        data.train_urls='http://127.0.0.1:PORT/big-{000000..099999}.tar' data.generate_digits=false \\
        eval.zero_shot=[] eval.retrieval=[] train.max_steps=2 logging.log_every=1 train.output_dir=TMP

with DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1. ``data.generate_digits=false`` configures the data
as any real data set's config does: the tiny experiment's digits data config turns it on, and
with it on, the configuration check leaves the shard URLs alone. This process writes clipdist's
digits shards (``ensure_digits_shards``: train-000000..000003.tar and train-index.json) into a
temp folder and serves it from a loopback ThreadingHTTPServer (tests/http_server.py's
ShardServer), in a thread of this process, so the server's CPU time never counts against a rank:

* (a) ``big-{000000..099999}.tar``: 100,000 URLs, shard n served from the real tar n % 4, with
  one index beside them (``big-index.json``, written by clipdist.data.shards.write_index_file)
  that lists all 100,000 with the true sample counts of the tars they map to;
* (b) ``train-{000000..000003}.tar``: the 4 real tars under their own names, with their own index.

"First step" is the moment the run's metrics.jsonl gets its first row (rank 0 writes and flushes
it after optimizer step 1; log_every=1), polled every 50 ms, measured from just before the torchrun
process is started. Also recorded per launch: the wall time of the whole run (through its final
checkpoint and exit), the GET requests the server had answered by the first step, and the
data-planning seconds clipdist logs itself (clipdist.data.counts: "data.train_urls: N shards,
M samples; counts from index N (S s)", parsed from the torchrun output).

After the timed launches, ``--trace-rounds`` (default 1) more of each case run through a small
wrapper script in place of ``-m clipdist.train``, which prints when every rank enters and leaves
clipdist's start-up phases (config, init, TrainData and its counting and broadcast, model, engine,
first step); the report gives each phase per case and the difference. Those launches are not in
the timed medians.

One untimed launch comes first: on a fresh machine DeepSpeed compiles its CPU shared-memory
communication op (deepspeed_shm_comm) at the first launch (≈ 40 s on 2 cores), which neither case
should pay. Then the cases alternate, a b, b a, a b ..., so that load from other jobs hits both
alike; the report gives medians and the ratio (a) / (b).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from _common import describe_machine, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from http_server import ShardServer  # noqa: E402 (tests/ is not a package)

from clipdist.data.digits import ensure_digits_shards  # noqa: E402
from clipdist.data.shards import read_index, write_index_file  # noqa: E402

BIG_PREFIX = "big"
POLL_S = 0.05
# clipdist.data.counts.count_all's line, after the log's time stamp.
PLANNING_LINE = re.compile(r"data\.train_urls: (\d+) shards, (\d+) samples; counts from (.+?) \(([0-9.]+) s\)")


# ---------------------------------------------------------------------------------------------
# Shards and the server


def big_name(n: int) -> str:
    return f"{BIG_PREFIX}-{n:06d}.tar"


def big_alias(real: List[str], num_shards: int) -> Callable[[str], Optional[str]]:
    """``big-NNNNNN.tar`` -> the real tar NNNNNN % len(real); anything else is served as named."""
    pattern = re.compile(rf"{BIG_PREFIX}-(\d{{6}})\.tar")

    def alias(name: str) -> Optional[str]:
        match = pattern.fullmatch(name)
        if match is None or int(match.group(1)) >= num_shards:
            return None
        return real[int(match.group(1)) % len(real)]

    return alias


def write_shards(root: Path, num_shards: int) -> Dict[str, Any]:
    """The 4 digits train shards and their index, plus big-index.json listing ``num_shards``
    aliases of them with the counts of the tars they map to."""
    ensure_digits_shards(str(root))
    real = read_index(str(root), "train")
    entries = [{"url": big_name(n), "samples": real[n % len(real)].samples} for n in range(num_shards)]
    write_index_file(str(root / f"{BIG_PREFIX}-index.json"), entries)
    return {
        "real": [s.url for s in real],
        "real_samples": [s.samples for s in real],
        "big_samples": sum(e["samples"] for e in entries),
        "big_index_bytes": (root / f"{BIG_PREFIX}-index.json").stat().st_size,
    }


# ---------------------------------------------------------------------------------------------
# --trace: where the seconds go inside the ranks

# Run by torchrun in place of ``-m clipdist.train``: it wraps the phases of clipdist.train's
# start-up (by name; a name that is gone is skipped) so that each rank prints when it enters and
# leaves them, then calls clipdist.train.main.
TRACER = """
import functools, os, sys, time
rank = os.environ.get("RANK", "?")
def mark(what):
    sys.stderr.write(f"@trace r{rank} {time.time():.4f} {what}\\n"); sys.stderr.flush()
mark("python")
import clipdist.train as train, clipdist.data.epochs as epochs
mark("imported")
def wrap(module, name):
    fn = getattr(module, name, None)
    if fn is None:
        return
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        mark(f"> {name}")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"< {name}")
    setattr(module, name, traced)
for name in ("start", "init_distributed", "prepare_shards", "build_model", "build_engine", "train_step"):
    wrap(train, name)
for name in ("count_sources", "check_sources_readable", "computed_on_rank_zero", "dataset_fingerprint"):
    wrap(epochs, name)
data_init = epochs.TrainData.__init__
def traced_init(self, *args, **kwargs):
    mark("> TrainData"); data_init(self, *args, **kwargs); mark("< TrainData")
epochs.TrainData.__init__ = traced_init
sys.exit(train.main(sys.argv[1:]))
"""
TRACE_LINE = re.compile(r"@trace r(\d+) ([0-9.]+) (.+)")


def trace_phases(log: str, launched_at: float) -> Dict[str, float]:
    """Seconds per phase from the tracer's lines (first occurrence of each event per rank)."""
    events: Dict[tuple, float] = {}
    for rank, when, what in TRACE_LINE.findall(log):
        events.setdefault((int(rank), what.strip()), float(when) - launched_at)

    def span(name: str, rank: int = 0) -> Optional[float]:
        enter, leave = events.get((rank, f"> {name}")), events.get((rank, f"< {name}"))
        return None if enter is None or leave is None else leave - enter

    def gap(first: tuple, then: tuple) -> Optional[float]:
        return None if first not in events or then not in events else events[then] - events[first]

    phases = {
        "torchrun to rank 0's interpreter": events.get((0, "python")),
        "imports": gap((0, "python"), (0, "imported")),
        "config (load + validate)": span("start"),
        "init_distributed": span("init_distributed"),
        "TrainData, rank 0": span("TrainData"),
        "  count_sources (rank 0)": span("count_sources"),
        "  check_sources_readable (rank 0)": span("check_sources_readable"),
        "  broadcast to the other ranks (rank 0)": gap((0, "< check_sources_readable"), (0, "< computed_on_rank_zero")),
        "  dataset_fingerprint": span("dataset_fingerprint"),
        "TrainData, rank 1 (waits for rank 0, unpickles)": span("TrainData", 1),
        "build_model": span("build_model"),
        "build_engine": span("build_engine"),
        "engine built to first step (loader, first batch)": gap((0, "< build_engine"), (0, "> train_step")),
        "first train_step": span("train_step"),
    }
    return {name: value for name, value in phases.items() if value is not None}


# ---------------------------------------------------------------------------------------------
# One launch


def torchrun_command() -> List[str]:
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]


def launch_command(urls: str, out_dir: Path, nproc: int, max_steps: int, tracer: Optional[Path] = None) -> List[str]:
    program = [str(tracer)] if tracer else ["-m", "clipdist.train"]
    return [
        *torchrun_command(), "--standalone", "--nproc_per_node", str(nproc), *program, "+experiment=tiny",
        f"data.train_urls='{urls}'", "data.generate_digits=false", "eval.zero_shot=[]", "eval.retrieval=[]",
        f"train.max_steps={max_steps}", "logging.log_every=1", f"train.output_dir={out_dir}",
    ]


def has_row(metrics: Path) -> bool:
    try:
        with open(metrics, "rb") as f:
            return b"\n" in f.read(1 << 16)
    except FileNotFoundError:
        return False


def parse_planning(log: str) -> Optional[Dict[str, Any]]:
    match = PLANNING_LINE.search(log)
    if match is None:
        return None
    return {"shards": int(match.group(1)), "samples": int(match.group(2)), "origins": match.group(3),
            "seconds": float(match.group(4)), "line": match.group(0)}


def launch(server: ShardServer, urls: str, run_dir: Path, args: argparse.Namespace, tracer: Optional[Path] = None) -> Dict[str, Any]:
    """One torchrun launch; time to metrics.jsonl's first row, whole-run time, GETs, planning."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("CLIPDIST_TRAIN_URLS", None)
    if tracer:  # the tracer script imports clipdist from the repository
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    log_path = run_dir.with_suffix(".log")
    metrics = run_dir / "metrics.jsonl"
    command = launch_command(urls, run_dir, args.nproc, args.max_steps, tracer)
    gets_at_start = len(server.requests)
    first_step: Optional[float] = None
    gets_first: Optional[int] = None
    with open(log_path, "w") as log:
        launched_at = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while process.poll() is None:
                if first_step is None and has_row(metrics):
                    first_step = time.perf_counter() - started
                    gets_first = len(server.requests) - gets_at_start
                if time.perf_counter() - started > args.timeout:
                    break
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:
                # torchrun passes SIGTERM on to its ranks (each in a session of its own) and waits
                # for them; killing torchrun outright would leave them running.
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        wall = time.perf_counter() - started
    text = log_path.read_text()
    if wall > args.timeout:
        raise RuntimeError(f"{urls}: stopped after {args.timeout:.0f} s (--timeout); the end of its output:\n{text[-4000:]}")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\nexited with {process.returncode}:\n{text[-4000:]}")
    if first_step is None and has_row(metrics):  # the whole run fitted between two polls
        first_step, gets_first = wall, len(server.requests) - gets_at_start
    if first_step is None:
        raise RuntimeError(f"{urls}: the run ended without a row in {metrics}:\n{text[-4000:]}")
    requests = server.requests[gets_at_start:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    # Each run leaves a ≈ 165 MB checkpoint; its write-back must not slow the next launch's start.
    shutil.rmtree(run_dir, ignore_errors=True)
    phases = {"phases": trace_phases(text, launched_at)} if tracer else {}
    return {
        "seconds_to_first_step": first_step,
        "run_seconds": wall,
        "gets_before_first_step": gets_first,
        "gets": len(requests),
        "tar_gets": sum(r.path.endswith(".tar") for r in requests),
        "not_found": sum(r.status == 404 for r in requests),
        "first_requests": [f"{r.status} {r.path}" for r in requests[: min(gets_first, 12)]],
        "planning": parse_planning(text),
        # Steps after the first: a cost per step that grows with the shards would show here.
        "later_steps_samples_per_second": [r["perf/samples_per_second"] for r in rows[1:] if "perf/samples_per_second" in r],
        "warnings": [line for line in text.splitlines() if re.search(r"\bwarn|error|retry", line, re.IGNORECASE)
                     and "No CUDA runtime is found" not in line][:20],
        **phases,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def phase_medians(runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, float]]:
    """Per traced phase: the median seconds of each case and their difference a - b."""
    names = [name for name in runs["a"][0]["phases"] if all(name in r["phases"] for group in runs.values() for r in group)]
    table = {}
    for name in names:
        a, b = (statistics.median(r["phases"][name] for r in runs[case]) for case in ("a", "b"))
        table[name] = {"a": a, "b": b, "a_minus_b": a - b}
    return table


def summarize(runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    def median(case: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[case])

    def planning(case: str) -> Optional[float]:
        values = [r["planning"]["seconds"] for r in runs[case] if r["planning"]]
        return statistics.median(values) if values else None

    cases = {
        case: {
            "seconds_to_first_step": median(case, "seconds_to_first_step"),
            "run_seconds": median(case, "run_seconds"),
            "gets_before_first_step": median(case, "gets_before_first_step"),
            "planning_seconds": planning(case),
            "later_steps_samples_per_second": statistics.median(v for r in runs[case] for v in r["later_steps_samples_per_second"])
            if any(r["later_steps_samples_per_second"] for r in runs[case]) else None,
        }
        for case in runs
    }
    a, b = cases["a"], cases["b"]
    per_round = [ra["seconds_to_first_step"] / rb["seconds_to_first_step"] for ra, rb in zip(runs["a"], runs["b"])]
    return {
        "cases": cases,
        "first_step_ratio_a_over_b": a["seconds_to_first_step"] / b["seconds_to_first_step"],
        "first_step_ratio_per_round": per_round,
        "first_step_extra_seconds": a["seconds_to_first_step"] - b["seconds_to_first_step"],
        "run_ratio_a_over_b": a["run_seconds"] / b["run_seconds"],
        "planning_extra_seconds": None if a["planning_seconds"] is None or b["planning_seconds"] is None
        else a["planning_seconds"] - b["planning_seconds"],
    }


def format_report(result: Dict[str, Any]) -> str:
    names = {"a": f"(a) {result['shards']['a_urls']:,} URLs, one index", "b": f"(b) {result['shards']['b_urls']} URLs"}
    lines = [f"{'case':<28}{'first step s':>14}{'run s':>9}{'GETs':>7}{'planning s':>12}{'step 2+ samples/s':>19}   "
             "per launch (first step s)"]
    summary = result["summary"]
    for case, entry in summary["cases"].items():
        each = ", ".join(f"{r['seconds_to_first_step']:.2f}" for r in result["runs"][case])
        planning = "-" if entry["planning_seconds"] is None else f"{entry['planning_seconds']:.2f}"
        later = "-" if entry["later_steps_samples_per_second"] is None else f"{entry['later_steps_samples_per_second']:.0f}"
        lines.append(f"{names[case]:<28}{entry['seconds_to_first_step']:>14.2f}{entry['run_seconds']:>9.2f}"
                     f"{entry['gets_before_first_step']:>7.0f}{planning:>12}{later:>19}   {each}")
    lines.append(f"\n(a) / (b), time to first step: {summary['first_step_ratio_a_over_b']:.2f} (medians; per round "
                 + ", ".join(f"{r:.2f}" for r in summary["first_step_ratio_per_round"])
                 + f"), {summary['first_step_extra_seconds']:+.2f} s; whole run {summary['run_ratio_a_over_b']:.2f}")
    if summary["planning_extra_seconds"] is not None:
        lines.append(f"data planning (clipdist's own log line): {summary['planning_extra_seconds']:+.2f} s of the difference")
    for case in ("a", "b"):
        line = result["runs"][case][0]["planning"]
        lines.append(f"  {case}: {line['line'] if line else 'no planning line found in the log'}")
    if "phases" in summary:
        lines.append(f"\n{'phase (rank 0 unless named; medians)':<52}{'(a) s':>8}{'(b) s':>8}{'a - b':>8}")
        for name, entry in summary["phases"].items():
            lines.append(f"{name:<52}{entry['a']:>8.2f}{entry['b']:>8.2f}{entry['a_minus_b']:>+8.2f}")
    return "\n".join(lines)


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000, help="URLs in case (a)")
    parser.add_argument("--rounds", type=int, default=4, help="timed launches of each case, alternating")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per launch before it counts as hung")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first launch")
    parser.add_argument("--trace-rounds", type=int, default=1,
                        help="extra launches of each case, after the timed ones, through a wrapper that times clipdist's "
                        "start-up phases in every rank (not in the timed medians); 0: none")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/startup.json"))
    return parser.parse_args(argv)


def alternate(server: ShardServer, urls: Dict[str, str], rounds: int, tmp: Path, args: argparse.Namespace,
              tracer: Optional[Path] = None, label: str = "round") -> Dict[str, List[Dict[str, Any]]]:
    """``rounds`` launches of each case, in the order a b, b a, a b ..."""
    runs: Dict[str, List[Dict[str, Any]]] = {"a": [], "b": []}
    for round_ in range(rounds):
        for case in ("ab" if round_ % 2 == 0 else "ba"):
            run = launch(server, urls[case], tmp / f"{label}-{case}{round_}", args, tracer)
            runs[case].append(run)
            print(f"{label} {round_} ({case}): first step {run['seconds_to_first_step']:.2f} s, run {run['run_seconds']:.2f} s, "
                  f"{run['gets_before_first_step']} GETs before it, planning "
                  f"{run['planning']['seconds'] if run['planning'] else '?'} s", flush=True)
    return runs


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipdist-startup-") as tmp:
        root = Path(tmp) / "shards"
        root.mkdir()
        shards = write_shards(root, args.shards)
        tracer = Path(tmp) / "trace_train.py"
        tracer.write_text(TRACER)
        with ShardServer(root, alias=big_alias(shards["real"], args.shards)) as server:
            last = len(shards["real"]) - 1
            urls = {"a": server.url(f"{BIG_PREFIX}-{{000000..{args.shards - 1:06d}}}.tar"),
                    "b": server.url(f"train-{{000000..{last:06d}}}.tar")}
            warmup = None
            if not args.no_warmup:
                warmup = launch(server, urls["b"], Path(tmp) / "warmup", args)["run_seconds"]
                print(f"warm-up launch (untimed): {warmup:.1f} s", flush=True)
            runs = alternate(server, urls, args.rounds, Path(tmp), args)
            traced = alternate(server, urls, args.trace_rounds, Path(tmp), args, tracer, "traced") if args.trace_rounds else None
    summary = summarize(runs)
    if traced:
        summary["phases"] = phase_medians(traced)
    result = {
        "machine": describe_machine(),
        "command": " ".join(["torchrun", *launch_command("URLS", Path("TMP"), args.nproc, args.max_steps)[len(torchrun_command()):]]),
        "env": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        "shards": {"a_urls": args.shards, "b_urls": len(shards["real"]), "a_samples": shards["big_samples"],
                   "b_samples": sum(shards["real_samples"]), "a_index_bytes": shards["big_index_bytes"],
                   "real_tars": dict(zip(shards["real"], shards["real_samples"]))},
        "rounds": args.rounds,
        "trace_rounds": args.trace_rounds,
        "warmup_run_seconds": warmup,
        "runs": runs,
        "traced_runs": traced,
        "summary": summary,
    }
    print()
    print(format_report(result))
    write_result(args.out, result, started)
    print(f"\n({time.perf_counter() - started:.0f} s in all; {args.out})")


if __name__ == "__main__":
    main()
