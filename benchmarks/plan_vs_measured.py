"""The capacity planner against measurement: predicted peak memory (``clipdist.plan``) beside the
measured peak resident set of a real training step, per config, on 2 gloo CPU ranks.

    python benchmarks/plan_vs_measured.py                 # every config below, ≈ 10 min
    python benchmarks/plan_vs_measured.py --only vitb32   # the configs whose name contains it
    python benchmarks/plan_vs_measured.py --replan        # the recorded measurements, predictions made again

Each config runs in a fresh process pair with glibc's mmap threshold fixed
(``_common.MEMORY_WORKER_ENV``, so RSS rises and falls with live tensors). A rank imports
everything and meets its peer first; from there the measure is the rise of its peak resident set
(VmHWM) over its resident set (VmRSS): building the model and its DeepSpeed engine
(``clipdist.engine.build_engine``), making the step's random inputs and running two optimizer steps
(``clipdist.engine.train_step``, the loop's own; AdamW's state exists from the first). The
larger rank's rise is compared with the plan's peak for the same shape (``device="cpu"``: the
plan counts what a CPU process holds). Target: every config within ±15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List

import torch
from _common import MEMORY_WORKER_ENV, describe_machine, free_port, random_clip_inputs, read_status_bytes, run_ranks, torchrun_env, write_result

from clipdist.config import load_config
from clipdist.plan.memory import Shape, budget

WORLD_SIZE = 2
MIB = 2**20
TOLERANCE = 0.15

# name: (overrides, micro-batch per rank, micro-batches per step). Spans model size (RN-tiny,
# ViT-tiny, ViT-B/32), checkpointing on and off, GradCache k = 1 / 4 / 16, gather against ring
# at global batches of 8k to 64k, and ZeRO 0 against 3.
CONFIGS: Dict[str, tuple] = {
    "vit_tiny_b512": (["model=vit_tiny"], 512, 1),
    "vit_tiny_b512_ckpt": (["model=vit_tiny", "model.grad_checkpointing=true"], 512, 1),
    "vit_tiny_k4": (["model=vit_tiny"], 128, 4),
    "vit_tiny_k16": (["model=vit_tiny"], 32, 16),
    "rn_tiny_b512": (["model=rn_tiny"], 512, 1),
    "rn_tiny_b512_ckpt": (["model=rn_tiny", "model.grad_checkpointing=true"], 512, 1),
    "vitb32_b16_zero0": (["model=vitb32"], 16, 1),
    "vitb32_b16_zero3": (["model=vitb32", "deepspeed.zero_stage=3"], 16, 1),
    "vitb32_b32_ckpt_zero3": (["model=vitb32", "model.grad_checkpointing=true", "deepspeed.zero_stage=3"], 32, 1),
    "vit_tiny_gather_8k": (["model=vit_tiny", "loss.impl=gather"], 256, 16),
    "vit_tiny_ring_8k": (["model=vit_tiny", "loss.impl=ring", "loss.chunk_size=1024"], 256, 16),
    "vit_tiny_gather_16k": (["model=vit_tiny", "loss.impl=gather"], 512, 16),
    "vit_tiny_ring_64k": (["model=vit_tiny", "loss.impl=ring", "loss.chunk_size=1024"], 1024, 32),
}


def config_for(overrides: List[str]):
    return load_config(["deepspeed=cpu_fp32", *overrides])[0]


def shape_of(cfg, micro_batch: int, accum: int) -> Shape:
    return Shape(
        world_size=WORLD_SIZE,
        micro_batch=micro_batch,
        accum_steps=accum,
        loss_impl=cfg.loss.impl,
        chunk_size=cfg.loss.chunk_size,
        grad_checkpointing=cfg.model.grad_checkpointing,
        zero_stage=cfg.deepspeed.zero_stage,
        precision=cfg.deepspeed.precision,
        device="cpu",
    )


def run_rank(args: argparse.Namespace) -> Dict[str, Any]:
    import deepspeed  # noqa: F401  (imported before the baseline, as everything else)
    import torch.distributed as dist

    from clipdist.data import Batch
    from clipdist.distributed import DistEnv, destroy_distributed, init_distributed
    from clipdist.engine import build_engine, train_step
    from clipdist.losses import build_loss
    from clipdist.models import build_model

    torch.set_num_threads(1)
    overrides, micro_batch, accum = CONFIGS[args.worker]
    cfg = config_for(overrides)
    env = DistEnv.from_environ()
    init_distributed(env, backend="gloo")
    dist.all_reduce(torch.zeros(1))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = read_status_bytes("VmRSS")
    try:
        torch.manual_seed(0)
        engine = build_engine(
            build_model(cfg.model), cfg.optim, cfg.deepspeed, local_batch=micro_batch, accum_steps=accum, world_size=WORLD_SIZE, total_steps=100
        )
        after_engine = read_status_bytes("VmRSS") - baseline
        generator = torch.Generator().manual_seed(env.rank)
        batches = []
        for _ in range(accum):
            images, tokens = random_clip_inputs(cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size, micro_batch, generator)
            batches.append(Batch(images=images, tokens=tokens, keys=[], skipped={}, sources={}))
        loss_fn = build_loss(cfg.loss)
        started = time.perf_counter()
        for _ in range(2):
            train_step(engine, loss_fn, batches, torch.device("cpu"), torch.float32)
        return {
            "peak_bytes": read_status_bytes("VmHWM") - baseline,
            "after_engine_bytes": after_engine,
            "after_steps_bytes": read_status_bytes("VmRSS") - baseline,
            "two_steps_seconds": time.perf_counter() - started,
        }
    finally:
        destroy_distributed()


def measure(name: str) -> Dict[str, Any]:
    port = free_port()
    envs = [{**os.environ, "DS_ACCELERATOR": "cpu", **MEMORY_WORKER_ENV, **torchrun_env(rank, WORLD_SIZE, port)} for rank in range(WORLD_SIZE)]
    ranks = run_ranks([[sys.executable, __file__, "--worker", name]] * WORLD_SIZE, envs, name)
    return {"rank_peak_bytes": [r["peak_bytes"] for r in ranks], **max(ranks, key=lambda r: r["peak_bytes"])}


def compare(name: str, measured: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """The plan for config ``name`` beside its measurement (taken now unless given)."""
    overrides, micro_batch, accum = CONFIGS[name]
    cfg = config_for(overrides)
    shape = shape_of(cfg, micro_batch, accum)
    plan = budget(cfg, shape)
    measured = measured or measure(name)
    predicted = plan.train_peak  # the benchmark trains; it does not evaluate
    error = predicted / measured["peak_bytes"] - 1
    return {
        "name": name,
        "overrides": overrides,
        "shape": asdict(shape),
        "global_batch": shape.global_batch,
        "predicted_bytes": predicted,
        "predicted_phase": plan.train_peak_phase,
        "predicted_components": plan.components,
        "predicted_peaks": plan.peaks,
        "measured": measured,
        "error": error,
        "within_tolerance": abs(error) <= TOLERANCE,
    }


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the configs whose name contains this")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_vs_measured.json"))
    parser.add_argument("--replan", action="store_true", help="keep --out's measurements, recompute the predictions (after a change of the model)")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: List[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_rank(args)))
        return 0
    started = time.perf_counter()
    names = [name for name in CONFIGS if args.only in name]
    recorded = {case["name"]: case["measured"] for case in json.loads(args.out.read_text())["cases"]} if args.replan else {}
    print(f"{'config':<24}{'global':>8}{'phase':>28}{'plan MiB':>10}{'measured':>10}{'error':>8}")
    cases = []
    for name in names:
        case = compare(name, recorded.get(name))
        cases.append(case)
        print(f"{name:<24}{case['global_batch']:>8}{case['predicted_phase']:>28}{case['predicted_bytes'] / MIB:>10.1f}"
              f"{case['measured']['peak_bytes'] / MIB:>10.1f}{case['error']:>+8.1%}", flush=True)  # fmt: skip
    worst = max(cases, key=lambda c: abs(c["error"]))
    result = {
        "machine": {**describe_machine(), "device": "cpu", "memory_metric": "VmHWM rise over VmRSS after imports and process-group start, max over ranks"},
        "world_size": WORLD_SIZE,
        "tolerance": TOLERANCE,
        "worst": {"name": worst["name"], "error": worst["error"]},
        "all_within_tolerance": all(c["within_tolerance"] for c in cases),
        "cases": cases,
    }
    write_result(args.out, result, started)
    print(f"worst: {worst['name']} {worst['error']:+.1%}; wrote {args.out}")
    return 0 if result["all_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
