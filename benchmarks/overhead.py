"""What clipdist's training step costs over a minimal plain-PyTorch DDP step of the same model
and loss, on 2 gloo CPU ranks, measured side by side in one run.

    python benchmarks/overhead.py                       # 20 rounds, ≈ 70 s on 2 cores
    python benchmarks/overhead.py --profile             # also where each step's time goes

Both loops live in the same pair of rank processes, start from the same weights (the tiny
experiment's model, seeded alike on every rank) and consume the same synthetic batches, held in
memory, so neither data loading nor anything but the step itself is timed:

- clipdist: ``clipdist.engine.train_step`` on a real DeepSpeed engine (``build_engine``, the
  experiment's DeepSpeed config: ZeRO-0, fp32, gradient clipping) with the configured loss
  (``build_loss``: the gathered CLIP loss);
- plain: ``DistributedDataParallel``, ``torch.optim.AdamW`` with the same hyperparameters and its
  multi-tensor (foreach) kernel, as clipdist's optimizer uses on the CPU, the same gradient
  clipping, and a hand-written all-gather with the symmetric cross-entropy.

Rounds alternate between the two (each round runs ``--steps`` steps of one, then of the other,
the order swapping every round) so that load from other jobs on the machine hits both alike.
Every step starts at a barrier; its time is the slower rank's. The first ``--warmup-rounds`` are
not counted. The result: median step time of each, and clipdist ÷ plain, both as the ratio of
the medians and as the median of the per-round ratios (each round's pair ran back to back).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import describe_machine, free_port, random_clip_inputs, run_ranks, torchrun_env, write_result
from torch.nn.parallel import DistributedDataParallel

from clipdist.config import Config, load_config
from clipdist.data import Batch
from clipdist.distributed import DistEnv, destroy_distributed, init_distributed
from clipdist.engine import build_engine, effective_precision, input_dtype, train_step
from clipdist.losses import build_loss
from clipdist.models import build_model

WORLD_SIZE = 2
IMPLS = ("clipdist", "plain")
TARGET_RATIO = 1.10


class AllGather(torch.autograd.Function):
    """[b, d] per rank -> [world * b, d]; each rank's slice feeds every rank's loss, so its
    gradient is the sum over ranks of the full gradient's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def plain_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The local rows' symmetric cross-entropy against the global batch (what clipdist's gathered
    loss computes); DDP's gradient averaging then gives the full-batch gradient."""
    image_all, text_all = AllGather.apply(image_emb), AllGather.apply(text_emb)
    labels = torch.arange(image_emb.shape[0]) + dist.get_rank() * image_emb.shape[0]
    logits_per_image = logit_scale * image_emb @ text_all.T
    logits_per_text = logit_scale * text_emb @ image_all.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def build_steps(cfg: Config, total_steps: int) -> Dict[str, Callable[[Batch], torch.Tensor]]:
    """One step function per implementation, over models with identical initial weights."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    plain_model = DistributedDataParallel(copy.deepcopy(model))
    engine = build_engine(
        model, cfg.optim, cfg.deepspeed, local_batch=cfg.data.local_batch, accum_steps=1, world_size=WORLD_SIZE, total_steps=total_steps
    )
    loss_fn, device, dtype = build_loss(cfg.loss), torch.device("cpu"), input_dtype(cfg.deepspeed)
    # foreach: torch's fastest AdamW on the CPU (its default there is the per-parameter loop).
    optimizer = torch.optim.AdamW(
        plain_model.parameters(),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        foreach=True,
    )

    def clipdist_step(batch: Batch) -> torch.Tensor:
        return train_step(engine, loss_fn, [batch], device, dtype)[0]

    def plain_step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = plain_clip_loss(*plain_model(batch.images, batch.tokens))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), cfg.deepspeed.grad_clip)
        optimizer.step()
        return loss.detach()

    return {"clipdist": clipdist_step, "plain": plain_step}


def synthetic_batches(cfg: Config, count: int, rank: int) -> List[Batch]:
    generator = torch.Generator().manual_seed(1000 + rank)
    size, text = cfg.model.vision.image_size, cfg.model.text
    batches = []
    for _ in range(count):
        images, tokens = random_clip_inputs(size, text.context_length, text.vocab_size, cfg.data.local_batch, generator)
        batches.append(Batch(images=images, tokens=tokens, keys=[], skipped={}, sources={}))
    return batches


def timed(step: Callable[[Batch], torch.Tensor], batch: Batch) -> Dict[str, float]:
    dist.barrier()  # both ranks start together: a step's time is then the slower rank's
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = step(batch)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu, "loss": loss.item()}


def run_rank(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = load_config(["+experiment=tiny", *args.override])[0]
    cfg.deepspeed = effective_precision(cfg.deepspeed)
    env = DistEnv.from_environ()
    init_distributed(env, backend="gloo")
    try:
        steps = build_steps(cfg, total_steps=args.rounds * args.steps + 1)
        batches = synthetic_batches(cfg, args.steps, env.rank)
        rounds = []
        for index in range(args.rounds):
            order = IMPLS if index % 2 == 0 else IMPLS[::-1]
            rounds.append({impl: [timed(steps[impl], batch) for batch in batches] for impl in order})
        # Every rank profiles (the steps are collective); the parent prints rank 0's tables.
        return {"rounds": rounds, "profile": profile_steps(steps, batches) if args.profile else None}
    finally:
        destroy_distributed()


def profile_steps(steps: Dict[str, Callable[[Batch], torch.Tensor]], batches: List[Batch]) -> Dict[str, str]:
    """torch.profiler's table of each implementation's ops over a round, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for impl, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches:
                step(batch)
        tables[impl] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return tables


def slower_rank(ranks: List[Dict[str, Any]], index: int, impl: str, key: str) -> List[float]:
    """Round ``index`` of ``impl``: per step, the slower rank's ``key``."""
    per_step = zip(*(rank["rounds"][index][impl] for rank in ranks))
    return [max(step[key] for step in ranks_step) for ranks_step in per_step]


def summarise(ranks: List[Dict[str, Any]], warmup_rounds: int) -> Dict[str, Any]:
    """Medians over the counted rounds of each implementation, and clipdist ÷ plain."""
    counted = range(warmup_rounds, len(ranks[0]["rounds"]))
    result: Dict[str, Any] = {}
    for impl in IMPLS:
        seconds = [s for index in counted for s in slower_rank(ranks, index, impl, "seconds")]
        cpu_seconds = [s for index in counted for s in slower_rank(ranks, index, impl, "cpu_seconds")]
        result[impl] = {
            "median_step_seconds": statistics.median(seconds),
            "median_step_cpu_seconds": statistics.median(cpu_seconds),
            "step_seconds": seconds,
        }
    round_ratios = [
        statistics.median(slower_rank(ranks, index, "clipdist", "seconds")) / statistics.median(slower_rank(ranks, index, "plain", "seconds"))
        for index in counted
    ]
    result["ratio"] = result["clipdist"]["median_step_seconds"] / result["plain"]["median_step_seconds"]
    result["cpu_ratio"] = result["clipdist"]["median_step_cpu_seconds"] / result["plain"]["median_step_cpu_seconds"]
    result["median_round_ratio"] = statistics.median(round_ratios)
    result["round_ratio_quartiles"] = statistics.quantiles(round_ratios, n=4) if len(round_ratios) > 1 else round_ratios * 3
    result["round_ratios"] = round_ratios
    # Each implementation's first step starts from the same weights on the same batch.
    result["first_step_loss"] = {impl: [rank["rounds"][0][impl][0]["loss"] for rank in ranks] for impl in IMPLS}
    return result


def rank_command(args: argparse.Namespace, rank: int) -> List[str]:
    command = [sys.executable, __file__, "--worker", "--rounds", str(args.rounds), "--warmup-rounds", str(args.warmup_rounds)]
    command += ["--steps", str(args.steps), "--threads", str(args.threads)]
    command += ["--profile"] if args.profile else []
    return command + [f"--override={override}" for override in args.override]


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds, warm-up included")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="first rounds not counted")
    parser.add_argument("--steps", type=int, default=5, help="steps of each implementation per round")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // WORLD_SIZE), help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--override", action="append", default=[], help="a config override on top of +experiment=tiny (repeatable)")
    parser.add_argument("--profile", action="store_true", help="after the rounds, profile one round of each (rank 0's table)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_rounds < args.rounds:
        parser.error(f"--warmup-rounds must be in [0, --rounds), got {args.warmup_rounds} of {args.rounds}")
    for name in ("steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_rank(args)))
        return
    port = free_port()
    envs = [{**os.environ, "DS_ACCELERATOR": "cpu", **torchrun_env(rank, WORLD_SIZE, port)} for rank in range(WORLD_SIZE)]
    started = time.perf_counter()
    ranks = run_ranks([rank_command(args, rank) for rank in range(WORLD_SIZE)], envs, "overhead benchmark")
    summary = summarise(ranks, args.warmup_rounds)
    result = {
        "machine": {**describe_machine(), "device": "cpu", "load_average_at_start": os.getloadavg()[0]},
        "world_size": WORLD_SIZE,
        "threads_per_rank": args.threads,
        "config": ["+experiment=tiny", *args.override],
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "steps_per_round": args.steps,
        "target_ratio": TARGET_RATIO,
        **summary,
    }
    write_result(args.out, result, started)
    print(format_summary(result))
    if ranks[0]["profile"]:
        for impl, table in ranks[0]["profile"].items():
            print(f"\n--- {impl}: one round on rank 0, by self CPU time\n{table}")
    print(f"wrote {args.out}")


def format_summary(result: Dict[str, Any]) -> str:
    lines = [
        f"{WORLD_SIZE} gloo ranks x {result['threads_per_rank']} thread(s), {' '.join(result['config'])}, {result['machine']['cpu']}, torch {result['machine']['torch']}",
        f"{'':10}{'median step s':>15}{'median CPU s':>14}",
    ]
    for impl in IMPLS:
        lines.append(f"{impl:10}{result[impl]['median_step_seconds']:>15.4f}{result[impl]['median_step_cpu_seconds']:>14.4f}")
    lines.append(
        f"clipdist / plain: {result['ratio']:.3f} (median of round ratios {result['median_round_ratio']:.3f}, their quartiles "
        f"{' '.join(f'{q:.3f}' for q in result['round_ratio_quartiles'])}; CPU time {result['cpu_ratio']:.3f}); target <= {TARGET_RATIO}"
    )
    lines.append(f"first-step loss per rank: {result['first_step_loss']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
