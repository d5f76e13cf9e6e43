"""Peak memory and wall time of the global-batch CLIP loss, forward + backward, per rank:
``gather`` (all-gather, [b, B] logits) against ``ring`` ([b, chunk_size] tiles), on real gloo ranks.

    python benchmarks/loss_memory.py                          # 8k .. 128k, as in benchmarks/README.md
    python benchmarks/loss_memory.py --batches 1024 2048 --out /tmp/loss_memory.json

Every (implementation, global batch) case runs twice, each time in a fresh pair of processes
joined by a gloo group: once for memory, once for time. Each rank builds its inputs (normalised
[b, 512] float32 image and text embeddings that require grad, a (1,) logit scale) and runs the
loss once on a tiny batch so that thread pools and gloo buffers exist. The memory pair then
resets its peak resident set (VmHWM, via /proc/self/clear_refs) and runs one forward + backward
at the full size: peak memory is VmHWM minus the resident set before that step, which covers
every buffer the loss adds (gathered embeddings, [b, B] logits and their gradients for gather;
ring blocks, tiles, the embedding gradients themselves), the larger of the two ranks. The time
pair runs --repeats steps with glibc's default allocator, as training would: wall time is the
slower rank's, median over the steps, with CPU time beside it. The same seeds give both
implementations the same inputs, and their losses are compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import MEMORY_WORKER_ENV, describe_machine, peak_rss_rise, wait_all_or_kill

from clipdist.config import LossConfig
from clipdist.fileio import write_text_atomically
from clipdist.losses import build_loss

IMPLS = ("gather", "ring")
MEASURES = ("memory", "time")
WORLD_SIZE = 2
DEFAULT_BATCHES = (8192, 16384, 32768, 65536, 131072)
# Measured with OpenCLIP's gathered loss on this 2-core, 24 GB machine: 8.2 GiB per rank at 32k,
# so 64k would need ~34 GiB per rank. Larger gather cases are skipped and estimated instead.
DEFAULT_GATHER_MAX_BATCH = 32768
# Columns per ring tile. Ring's peak is about 10 [b, d] buffers plus 5 [b, chunk] tiles (fitted
# at small sizes here), so 256 keeps the tiles small beside the buffers even at b = 64k; its step
# time was within noise of 128..1024 on this CPU, 2048 was slower. loss.chunk_size defaults to 4096.
DEFAULT_CHUNK_SIZE = 256
CLIP_INIT_LOGIT_SCALE = 1 / 0.07
WARMUP_LOCAL_BATCH = 8
GIB = 2**30


def make_inputs(local_batch: int, dim: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-specific normalised embeddings, as the towers would hand them over, and the logit scale
    (already exponentiated). A fixed seed gives gather and ring identical inputs."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    image = F.normalize(torch.randn(local_batch, dim, generator=generator), dim=1).requires_grad_()
    text = F.normalize(torch.randn(local_batch, dim, generator=generator), dim=1).requires_grad_()
    logit_scale = torch.full((1,), CLIP_INIT_LOGIT_SCALE, requires_grad=True)
    return image, text, logit_scale


def timed_step(loss_fn: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Dict[str, float]:
    """One forward + backward from a clean slate: no gradients left from an earlier step, both
    ranks starting together. CPU time (all of this process's threads) is recorded beside wall
    time because it hardly moves when other jobs share the cores."""
    for tensor in inputs:
        tensor.grad = None
    dist.barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = loss_fn(*inputs)
    loss.backward()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu, "loss": loss.item()}


def run_rank(args: argparse.Namespace) -> Dict[str, Any]:
    """One rank of one case's memory or time measurement, in this process."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=WORLD_SIZE)
    try:
        loss_fn = build_loss(LossConfig(impl=args.worker, chunk_size=args.chunk_size))
        timed_step(loss_fn, make_inputs(WARMUP_LOCAL_BATCH, args.dim, args.rank, seed=1))
        inputs = make_inputs(args.global_batch // WORLD_SIZE, args.dim, args.rank)
        if args.measure == "memory":
            return {"peak_bytes": peak_rss_rise(lambda: timed_step(loss_fn, inputs))}
        steps = [timed_step(loss_fn, inputs) for _ in range(args.repeats)]
        return {
            "seconds": [step["seconds"] for step in steps],
            "cpu_seconds": [step["cpu_seconds"] for step in steps],
            "loss": steps[0]["loss"],
        }
    finally:
        dist.destroy_process_group()


def rank_command(args: argparse.Namespace, impl: str, global_batch: int, measure: str, rank: int, init_file: Path) -> List[str]:
    return [
        sys.executable, __file__, "--worker", impl, "--measure", measure, "--rank", str(rank), "--init-file", str(init_file),
        "--global-batch", str(global_batch), "--dim", str(args.dim), "--chunk-size", str(args.chunk_size),
        "--repeats", str(args.repeats), "--threads", str(args.threads),
    ]  # fmt: skip


def spawn_case(args: argparse.Namespace, impl: str, global_batch: int, measure: str) -> List[Dict[str, Any]]:
    """Measure one case on a fresh pair of rank processes; their results, in rank order."""
    # The fixed mmap threshold makes RSS follow the live tensors (see _common.MEMORY_WORKER_ENV),
    # but mapping and faulting in every tile afresh made ring's step up to 1.5x slower here,
    # gather's barely: time is measured with the default allocator, in a separate pair.
    env = {**os.environ, **(MEMORY_WORKER_ENV if measure == "memory" else {})}
    with tempfile.TemporaryDirectory(prefix="loss_memory_") as tmp:
        tmp_dir = Path(tmp)
        processes = []
        for rank in range(WORLD_SIZE):
            # Files, not pipes: a rank blocked on a full stderr pipe would stall its peer in a collective.
            with open(tmp_dir / f"{rank}.out", "w") as out, open(tmp_dir / f"{rank}.err", "w") as err:
                command = rank_command(args, impl, global_batch, measure, rank, tmp_dir / "store")
                processes.append(subprocess.Popen(command, stdout=out, stderr=err, env=env))
        exit_codes = wait_all_or_kill(processes)
        if any(exit_codes):
            report = "\n".join(
                f"--- rank {rank} exited with {code}:\n{(tmp_dir / f'{rank}.err').read_text()[-3000:]}"
                for rank, code in enumerate(exit_codes)
                if code
            )
            raise RuntimeError(f"{impl} at global batch {global_batch} ({measure}) failed:\n{report}")
        return [json.loads((tmp_dir / f"{rank}.out").read_text().strip().splitlines()[-1]) for rank in range(WORLD_SIZE)]


def summarise_case(memory: List[Dict[str, Any]], timing: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The larger rank peak; per step the slower rank's time, median over steps."""
    step_seconds = [max(times) for times in zip(*(rank["seconds"] for rank in timing))]
    step_cpu_seconds = [max(times) for times in zip(*(rank["cpu_seconds"] for rank in timing))]
    return {
        "peak_bytes": max(rank["peak_bytes"] for rank in memory),
        "seconds": statistics.median(step_seconds),
        "cpu_seconds": statistics.median(step_cpu_seconds),
        "rank_peak_bytes": [rank["peak_bytes"] for rank in memory],
        "step_seconds": step_seconds,
        "step_cpu_seconds": step_cpu_seconds,
        "mean_rank_loss": sum(rank["loss"] for rank in timing) / len(timing),
    }


def estimate_from(measured: Dict[int, Dict[str, Any]], global_batch: int) -> Optional[Dict[str, float]]:
    """Gather's [b, B] logits make memory and time quadratic in B: scale the largest measured case."""
    if not measured:
        return None
    largest = max(measured)
    factor = (global_batch / largest) ** 2
    return {"peak_bytes": round(measured[largest]["peak_bytes"] * factor), "seconds": measured[largest]["seconds"] * factor, "from_global_batch": largest}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return sys.maxsize


def skip_reason(args: argparse.Namespace, impl: str, global_batch: int, estimate: Optional[Dict[str, float]]) -> Optional[str]:
    """Why a gather case is not run: above --gather-max-batch, or its two ranks would not fit in
    the memory available now (estimated from a smaller measured case)."""
    if impl != "gather":
        return None
    if global_batch > args.gather_max_batch:
        return f"above --gather-max-batch {args.gather_max_batch}"
    if estimate is not None and WORLD_SIZE * estimate["peak_bytes"] > available_bytes():
        return f"{WORLD_SIZE} ranks x {estimate['peak_bytes'] / GIB:.1f} GiB > MemAvailable {available_bytes() / GIB:.1f} GiB"
    return None


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or denominator is None else numerator / denominator


Progress = Callable[[List[Dict[str, Any]], List[Dict[str, Any]], List[Dict[str, Any]]], None]


def run_cases(args: argparse.Namespace, progress: Progress) -> tuple[List[Dict[str, Any]], List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Cases in the result JSON's shape, the per-run details, and the skipped runs with estimates;
    ``progress`` sees them after every global batch."""
    cases, details, skipped = [], [], []
    measured: Dict[str, Dict[int, Dict[str, Any]]] = {impl: {} for impl in IMPLS}
    for global_batch in sorted(args.batches):
        for impl in IMPLS:
            estimate = estimate_from(measured[impl], global_batch) if impl == "gather" else None
            reason = skip_reason(args, impl, global_batch, estimate)
            if reason is not None:
                skipped.append({"impl": impl, "global_batch": global_batch, "reason": reason, "estimate": estimate})
                print(f"{impl:>6} B={global_batch:>6}: skipped ({reason}); estimated {describe_estimate(estimate)}", flush=True)
                continue
            result = summarise_case(*(spawn_case(args, impl, global_batch, measure) for measure in MEASURES))
            measured[impl][global_batch] = result
            details.append({"impl": impl, "global_batch": global_batch, **result})
            print(f"{impl:>6} B={global_batch:>6}: {result['peak_bytes'] / GIB:.3f} GiB per rank, {result['seconds']:.2f} s ({result['cpu_seconds']:.2f} s CPU)", flush=True)
        gather, ring = measured["gather"].get(global_batch), measured["ring"].get(global_batch)
        gather_bytes, ring_bytes = (None if r is None else r["peak_bytes"] for r in (gather, ring))
        gather_s, ring_s = (None if r is None else r["seconds"] for r in (gather, ring))
        cases.append({
            "global_batch": global_batch,
            "gather_peak_bytes": gather_bytes,
            "ring_peak_bytes": ring_bytes,
            "memory_ratio": ratio(gather_bytes, ring_bytes),
            "gather_seconds": gather_s,
            "ring_seconds": ring_s,
            "time_ratio": ratio(ring_s, gather_s),
        })  # fmt: skip
        progress(cases, details, skipped)
    return cases, details, skipped


def describe_estimate(estimate: Optional[Dict[str, float]]) -> str:
    if estimate is None:
        return "nothing (no smaller gather case measured)"
    return f"≈ {estimate['peak_bytes'] / GIB:.1f} GiB per rank, ≈ {estimate['seconds']:.0f} s (B² from {estimate['from_global_batch']})"


def format_table(cases: List[Dict[str, Any]], skipped: List[Dict[str, Any]], details: List[Dict[str, Any]]) -> str:
    """Markdown, ready for the README; a skipped gather case shows its estimate. The last column
    is the CPU-time ratio, which other jobs on the machine disturb far less than wall time."""
    estimates = {(s["impl"], s["global_batch"]): s["estimate"] for s in skipped}
    cpu_seconds = {(run["impl"], run["global_batch"]): run["cpu_seconds"] for run in details}

    def cell(value: Optional[float], fmt: str, impl: str, batch: int, key: str) -> str:
        if value is not None:
            return format(value, fmt)
        estimate = estimates.get((impl, batch))
        return "skipped" if estimate is None else f"skipped (≈ {format(estimate[key] / (GIB if key == 'peak_bytes' else 1), fmt)})"

    rows = [
        "| global batch | gather GiB/rank | ring GiB/rank | memory gather ÷ ring | gather s | ring s | time ring ÷ gather | CPU time ring ÷ gather |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        batch = case["global_batch"]
        gather_gib = None if case["gather_peak_bytes"] is None else case["gather_peak_bytes"] / GIB
        ring_gib = None if case["ring_peak_bytes"] is None else case["ring_peak_bytes"] / GIB
        cells = [
            f"{batch:,}",
            cell(gather_gib, ".3f", "gather", batch, "peak_bytes"),
            cell(ring_gib, ".3f", "ring", batch, "peak_bytes"),
            "–" if case["memory_ratio"] is None else f"{case['memory_ratio']:.1f}×",
            cell(case["gather_seconds"], ".2f", "gather", batch, "seconds"),
            cell(case["ring_seconds"], ".2f", "ring", batch, "seconds"),
            "–" if case["time_ratio"] is None else f"{case['time_ratio']:.2f}×",
            cpu_ratio(cpu_seconds, batch),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cpu_ratio(cpu_seconds: Dict[tuple[str, int], float], batch: int) -> str:
    gather, ring = cpu_seconds.get(("gather", batch)), cpu_seconds.get(("ring", batch))
    return "–" if gather is None or ring is None else f"{ring / gather:.2f}×"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="global batch sizes (even)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="ring: columns per logits tile (loss.chunk_size)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward+backward steps per case (median)")
    parser.add_argument("--gather-max-batch", type=int, default=DEFAULT_GATHER_MAX_BATCH, help="skip gather above this global batch")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // WORLD_SIZE), help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_memory.json"))
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for batch in args.batches:
        if batch < WORLD_SIZE or batch % WORLD_SIZE:
            parser.error(f"--batches: {batch} is not a positive multiple of the world size {WORLD_SIZE}")
    for name in ("chunk_size", "repeats", "dim", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_rank(args)))
        return
    started = time.perf_counter()
    machine = {**describe_machine(), "memory_metric": "VmHWM (peak RSS) rise, max over ranks"}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write_result(cases: List[Dict[str, Any]], details: List[Dict[str, Any]], skipped: List[Dict[str, Any]], complete: bool = False) -> None:
        # Rewritten after every global batch: a full run takes over an hour, and a run stopped at
        # 128k keeps what it measured below.
        result = {
            "world_size": WORLD_SIZE,
            "dim": args.dim,
            "dtype": "float32",
            "chunk_size": args.chunk_size,
            "repeats": args.repeats,
            "threads_per_rank": args.threads,
            "machine": machine,
            "cases": cases,
            "skipped": skipped,
            "runs": details,
            "complete": complete,
            "total_seconds": time.perf_counter() - started,
        }
        write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")

    cases, details, skipped = run_cases(args, write_result)
    write_result(cases, details, skipped, complete=True)
    print(f"\n{WORLD_SIZE} gloo ranks x {args.threads} thread(s), dim {args.dim}, float32, ring chunk {args.chunk_size}, {machine['cpu']}, torch {machine['torch']}")
    print(format_table(cases, skipped, details))
    check_losses_agree(details)
    print(f"wrote {args.out}")


def check_losses_agree(details: List[Dict[str, Any]]) -> None:
    """Same inputs, same loss: a disagreement means one implementation measured something else."""
    by_batch: Dict[int, Dict[str, float]] = {}
    for run in details:
        by_batch.setdefault(run["global_batch"], {})[run["impl"]] = run["mean_rank_loss"]
    for batch, losses in sorted(by_batch.items()):
        if len(losses) == len(IMPLS) and not math.isclose(losses["gather"], losses["ring"], rel_tol=1e-4):
            print(f"WARNING: at global batch {batch} gather's loss {losses['gather']:.6f} differs from ring's {losses['ring']:.6f}")


if __name__ == "__main__":
    main()
