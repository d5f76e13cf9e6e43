"""What exact accumulation (GradCache, ``train.accum_steps=k``) costs: step time and peak memory
of one optimizer step over the same global batch split into k = 1, 4, 16 micro-batches per rank,
against k = 1 (one batch of that global size), side by side on 2 gloo CPU ranks.

    python benchmarks/grad_cache_cost.py                                  # ViT-tiny, global batch 512, k = 1 4 16, ≈ 3 min
    python benchmarks/grad_cache_cost.py --model vitb32 --global-batch 32 --ks 1 4 --rounds 4

Every step is clipdist's own: ``clipdist.engine.train_step`` on a real DeepSpeed engine
(``build_engine``; ZeRO-0, fp32) with the gathered CLIP loss, on the same synthetic global batch
(each rank's G / 2 rows, cut into k micro-batches of G / (2k)).

- Time: one process pair holds one engine per k, all from the same seed, and runs ``--rounds``
  rounds; each round times one step of every k, in an order that rotates from round to round, so
  that load from other jobs hits all alike. A step's time is the slower rank's; the result is the
  median over the counted rounds (the first ``--warmup-rounds`` are not counted).
- Memory: each k in a fresh process pair with glibc's mmap threshold fixed
  (``_common.MEMORY_WORKER_ENV``): after one warm-up step (gradient buffers and optimizer state
  then exist), the rise of the peak resident set over one step, the larger rank's: activations,
  GradCache's embedding caches and the loss's buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from _common import MEMORY_WORKER_ENV, describe_machine, free_port, peak_rss_rise, random_clip_inputs, run_ranks, torchrun_env, write_result

from clipdist.config import load_config
from clipdist.data import Batch
from clipdist.distributed import DistEnv, destroy_distributed, init_distributed
from clipdist.engine import build_engine, train_step
from clipdist.losses import build_loss
from clipdist.models import build_model

WORLD_SIZE = 2
MIB = 2**20


def micro_batches(cfg, rows: int, k: int, rank: int) -> List[Batch]:
    """This rank's ``rows`` rows (the same for every k), cut into k micro-batches."""
    generator = torch.Generator().manual_seed(1000 + rank)
    images, tokens = random_clip_inputs(cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size, rows, generator)
    size = rows // k
    return [Batch(images=images[i : i + size], tokens=tokens[i : i + size], keys=[], skipped={}, sources={}) for i in range(0, rows, size)]


def engine_for(cfg, k: int, rows: int):
    torch.manual_seed(0)
    return build_engine(build_model(cfg.model), cfg.optim, cfg.deepspeed, local_batch=rows // k, accum_steps=k, world_size=WORLD_SIZE, total_steps=1000)


def step(engine, loss_fn, batches: List[Batch]) -> float:
    return train_step(engine, loss_fn, batches, torch.device("cpu"), torch.float32)[0].item()


def run_rank(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = load_config([f"model={args.model}", "deepspeed=cpu_fp32"])[0]
    env = DistEnv.from_environ()
    init_distributed(env, backend="gloo")
    rows = args.global_batch // WORLD_SIZE
    loss_fn = build_loss(cfg.loss)
    try:
        if args.worker == "memory":
            k = args.ks[0]
            engine, batches = engine_for(cfg, k, rows), micro_batches(cfg, rows, k, env.rank)
            step(engine, loss_fn, batches)  # warm-up: gradient buffers and AdamW state exist from here on
            dist.barrier()
            return {"k": k, "peak_bytes": peak_rss_rise(lambda: step(engine, loss_fn, batches))}
        engines = {k: engine_for(cfg, k, rows) for k in args.ks}
        batches = {k: micro_batches(cfg, rows, k, env.rank) for k in args.ks}
        rounds = []
        for index in range(args.rounds):
            order = args.ks[index % len(args.ks) :] + args.ks[: index % len(args.ks)]
            timings = {}
            for k in order:
                dist.barrier()
                started = time.perf_counter()
                loss = step(engines[k], loss_fn, batches[k])
                timings[k] = {"seconds": time.perf_counter() - started, "loss": loss}
            rounds.append(timings)
        return {"rounds": rounds}
    finally:
        destroy_distributed()


def spawn(args: argparse.Namespace, worker: str, ks: List[int]) -> List[Dict[str, Any]]:
    port = free_port()
    command = [sys.executable, __file__, "--worker", worker, "--model", args.model, "--global-batch", str(args.global_batch)]
    command += ["--rounds", str(args.rounds), "--threads", str(args.threads), "--ks", *map(str, ks)]
    extra = MEMORY_WORKER_ENV if worker == "memory" else {}
    envs = [{**os.environ, "DS_ACCELERATOR": "cpu", **extra, **torchrun_env(rank, WORLD_SIZE, port)} for rank in range(WORLD_SIZE)]
    return run_ranks([command] * WORLD_SIZE, envs, f"{worker} of k={ks}")


def summarise(args: argparse.Namespace, timing: List[Dict[str, Any]], memory: Dict[int, int]) -> Dict[str, Any]:
    counted = range(args.warmup_rounds, args.rounds)
    cases = {}
    for k in args.ks:
        # JSON keys are strings: the rank processes' rounds came back through json.
        seconds = [max(rank["rounds"][index][str(k)]["seconds"] for rank in timing) for index in counted]
        cases[k] = {
            "micro_batch_per_rank": args.global_batch // WORLD_SIZE // k,
            "median_step_seconds": statistics.median(seconds),
            "step_seconds": seconds,
            "peak_step_bytes": memory[k],
            "first_step_loss": timing[0]["rounds"][0][str(k)]["loss"],
        }
    base = cases[args.ks[0]]
    for case in cases.values():
        case["time_vs_k1"] = case["median_step_seconds"] / base["median_step_seconds"]
        case["memory_vs_k1"] = case["peak_step_bytes"] / base["peak_step_bytes"]
    return {str(k): case for k, case in cases.items()}


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny", help="a conf/model name (default vit_tiny)")
    parser.add_argument("--global-batch", type=int, default=512, help="rows per optimizer step over both ranks (default 512)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="micro-batches per step; the first is the baseline (default 1 4 16)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds, warm-up included (default 8)")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="first rounds not counted (default 2)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // WORLD_SIZE), help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grad_cache_cost.json"))
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # its parent checked the arguments
        return args
    if args.ks[0] != 1:
        parser.error("--ks must start with 1, the one-batch baseline")
    for k in args.ks:
        if args.global_batch % (WORLD_SIZE * k):
            parser.error(f"--global-batch {args.global_batch} does not split into {WORLD_SIZE} ranks × {k} micro-batches")
    if not 0 <= args.warmup_rounds < args.rounds:
        parser.error(f"--warmup-rounds must be in [0, --rounds), got {args.warmup_rounds} of {args.rounds}")
    return args


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_rank(args)))
        return
    started = time.perf_counter()
    memory = {k: max(rank["peak_bytes"] for rank in spawn(args, "memory", [k])) for k in args.ks}
    timing = spawn(args, "time", args.ks)
    cases = summarise(args, timing, memory)
    result = {
        "machine": {**describe_machine(), "device": "cpu", "load_average_at_start": os.getloadavg()[0]},
        "model": args.model,
        "world_size": WORLD_SIZE,
        "global_batch": args.global_batch,
        "threads_per_rank": args.threads,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "cases": cases,
    }
    write_result(args.out, result, started)
    print(f"{args.model}, global batch {args.global_batch} on {WORLD_SIZE} gloo ranks, {describe_machine()['cpu']}")
    print(f"{'k':>4}{'micro/rank':>12}{'step s':>10}{'× k=1':>8}{'peak MiB':>10}{'× k=1':>8}")
    for k, case in cases.items():
        print(f"{k:>4}{case['micro_batch_per_rank']:>12}{case['median_step_seconds']:>10.3f}{case['time_vs_k1']:>8.2f}"
              f"{case['peak_step_bytes'] / MIB:>10.1f}{case['memory_vs_k1']:>8.2f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
