"""What an elastic resume of a ZeRO checkpoint costs: converting it to DeepSpeed's universal
form (once, on the first resume on another world size) and loading that, beside the ordinary
load of the same checkpoint on the world size that wrote it.

    python benchmarks/universal_checkpoint.py                              # ViT-B/32, ZeRO-2, 2 -> 1 rank, ≈ 2 min on 2 cores
    python benchmarks/universal_checkpoint.py --model vit_tiny --stage 3 --to 3

Three phases, each in fresh processes (gloo ranks on this machine):

1. ``--from`` ranks build the model's DeepSpeed engine (fp32, the ZeRO stage), take one AdamW
   step on random inputs (so the moments exist) and save with clipdist's Checkpointer;
2. the parent converts that checkpoint as a resume on another world size does
   (``clipdist.engine.checkpoint.convert_to_universal``, DeepSpeed's ``ds_to_universal``);
3. ``--from`` ranks load it the ordinary way, then ``--to`` ranks load the universal form
   (``Checkpointer.load``, the code a resume runs), each timed on the slower rank.

The result: seconds of each, the checkpoint's and the universal copy's sizes, and the
conversion's cost as a multiple of the ordinary load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from _common import describe_machine, free_port, random_clip_inputs, run_ranks, torchrun_env, write_result

from clipdist.config import load_config
from clipdist.data import Batch
from clipdist.distributed import DistEnv, destroy_distributed, init_distributed
from clipdist.engine import Checkpointer, TrainState, build_engine, train_step
from clipdist.engine.checkpoint import convert_to_universal, needs_universal_load
from clipdist.losses import build_loss
from clipdist.models import build_model


def rank_engine(args: argparse.Namespace, world_size: int, load_universal: bool = False):
    cfg = load_config([f"model={args.model}", f"deepspeed.zero_stage={args.stage}", "deepspeed.precision=fp32"])[0]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    engine = build_engine(
        model, cfg.optim, cfg.deepspeed, local_batch=args.batch, accum_steps=1, world_size=world_size, total_steps=10, load_universal=load_universal
    )
    return cfg, engine, num_params


def write_checkpoint(args: argparse.Namespace, env: DistEnv) -> Dict[str, Any]:
    cfg, engine, num_params = rank_engine(args, env.world_size)
    images, tokens = random_clip_inputs(cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size, args.batch)
    train_step(engine, build_loss(cfg.loss), [Batch(images=images, tokens=tokens, keys=[], skipped={}, sources={})], torch.device("cpu"), torch.float32)
    position = {"seed": 0, "stats": {"skipped": {}, "rows": {}}}  # what a resume reads of it here
    dist.barrier()
    started = time.perf_counter()
    Checkpointer(args.dir, env.rank).save(engine, TrainState(step=1), position)
    return {"save_seconds": time.perf_counter() - started, "parameters": num_params}


def load_checkpoint(args: argparse.Namespace, env: DistEnv) -> Dict[str, Any]:
    checkpoint = Path(args.dir) / "step_00000001"
    universal = needs_universal_load(checkpoint, env.world_size)
    _, engine, _ = rank_engine(args, env.world_size, load_universal=universal)
    dist.barrier()
    started = time.perf_counter()
    state, _ = Checkpointer(args.dir, env.rank).load(engine, checkpoint, universal=universal)
    return {"load_seconds": time.perf_counter() - started, "universal": universal, "step": state.step}


def run_phase(args: argparse.Namespace, phase: str, world_size: int) -> List[Dict[str, Any]]:
    port = free_port()
    command = [sys.executable, __file__, "--worker", phase, "--dir", args.dir, "--model", args.model, "--stage", str(args.stage), "--batch", str(args.batch)]
    envs = [{**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **torchrun_env(rank, world_size, port)} for rank in range(world_size)]
    return run_ranks([command] * world_size, envs, f"{phase} on {world_size} rank(s)")


def folder_bytes(folder: Path, exclude: str = "") -> int:
    """Bytes of the files under ``folder`` (a hard-linked file once), skipping ``exclude``."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if path.is_file() and not (exclude and exclude in path.relative_to(folder).parts):
            inode = path.stat().st_ino
            if inode not in seen:
                seen.add(inode)
                total += path.stat().st_size
    return total


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    written = run_phase(args, "write", args.from_ranks)
    checkpoint = Path(args.dir) / "step_00000001"
    started = time.perf_counter()
    convert_to_universal(checkpoint, checkpoint / "universal")
    convert_seconds = time.perf_counter() - started
    native = run_phase(args, "load", args.from_ranks)
    universal = run_phase(args, "load", args.to_ranks)
    assert not native[0]["universal"] and universal[0]["universal"] and universal[0]["step"] == 1, (native, universal)
    native_load = max(rank["load_seconds"] for rank in native)
    return {
        "parameters": written[0]["parameters"],
        "save_seconds": max(rank["save_seconds"] for rank in written),
        "convert_seconds": convert_seconds,
        "native_load_seconds": native_load,
        "universal_load_seconds": max(rank["load_seconds"] for rank in universal),
        "convert_over_native_load": convert_seconds / native_load,
        "checkpoint_bytes": folder_bytes(checkpoint, exclude="universal"),
        "universal_bytes": folder_bytes(checkpoint / "universal"),
    }


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vitb32", help="a conf/model name (default vitb32)")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage (default 2)")
    parser.add_argument("--from", dest="from_ranks", type=int, default=2, help="ranks that write the checkpoint (default 2)")
    parser.add_argument("--to", dest="to_ranks", type=int, default=1, help="ranks that resume it (default 1)")
    parser.add_argument("--batch", type=int, default=2, help="rows per rank in the one step taken")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/universal_checkpoint.json"))
    parser.add_argument("--worker", choices=("write", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_ranks == args.to_ranks:
        parser.error("--from and --to must differ: the same world size loads the checkpoint as it is")
    return args


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        env = DistEnv.from_environ()
        init_distributed(env, backend="gloo")
        try:
            print(json.dumps((write_checkpoint if args.worker == "write" else load_checkpoint)(args, env)))
        finally:
            destroy_distributed()
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipdist_universal_") as tmp:
        args.dir = tmp
        measured = measure(args)
    result = {
        "machine": {**describe_machine(), "device": "cpu", "load_average_at_start": os.getloadavg()[0]},
        "model": args.model,
        "zero_stage": args.stage,
        "from_ranks": args.from_ranks,
        "to_ranks": args.to_ranks,
        **measured,
    }
    write_result(args.out, result, started)
    gib = 1024**3
    print(
        f"{args.model} ({measured['parameters'] / 1e6:.1f}M parameters), ZeRO-{args.stage}, {args.from_ranks} -> {args.to_ranks} rank(s): "
        f"checkpoint {measured['checkpoint_bytes'] / gib:.2f} GiB, universal copy {measured['universal_bytes'] / gib:.2f} GiB\n"
        f"  convert {measured['convert_seconds']:.1f} s = {measured['convert_over_native_load']:.1f}x the ordinary load "
        f"({measured['native_load_seconds']:.1f} s on {args.from_ranks}); universal load {measured['universal_load_seconds']:.1f} s on {args.to_ranks}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
