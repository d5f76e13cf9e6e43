"""What gradient checkpointing costs (step time) and saves (peak memory) for one CLIP training
step: forward through both towers, the CLIP loss over the local batch, backward.

    python benchmarks/grad_checkpointing.py --model vitb32 --batch 8 --steps 3

Every measurement runs in a fresh subprocess, after one warm-up step, so that no case inherits
another's allocator state. Step time is the median over the timed steps. Peak memory is what
one step adds on top of the model and its gradients (which persist across steps, as they do
under an optimizer): torch.cuda.max_memory_allocated on CUDA, else the rise in the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from _common import MEMORY_WORKER_ENV, describe_machine as describe_host, peak_rss_rise

from clipdist.config import ModelConfig, load_config
from clipdist.losses import clip_loss_reference
from clipdist.models import CLIP, build_model

CASES = {"off": False, "on": True}
MEASURES = ("time", "memory")


def random_batch(cfg: ModelConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images at the model's resolution and full-length captions that end in the EOT token
    (the largest id, which the text tower pools at)."""
    size = cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (batch, cfg.text.context_length), device=device)
    tokens[:, -1] = cfg.text.vocab_size - 1
    return images, tokens


def train_step(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> None:
    # Zero in place rather than set to None: gradient buffers are persistent state, like the
    # optimizer's, not memory the step adds.
    model.zero_grad(set_to_none=False)
    image_emb, text_emb, logit_scale_exp = model(images, tokens)
    clip_loss_reference(image_emb, text_emb, logit_scale_exp).backward()


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes that one step holds at its peak beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    return peak_rss_rise(step)


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_worker(model_name: str, batch: int, steps: int, checkpointing: bool, measure: str, threads: int | None) -> Dict[str, Any]:
    """One measurement of one case, in this process, after one warm-up step."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config([f"model={model_name}"])[0].model
    model = build_model(cfg).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    images, tokens = random_batch(cfg, batch, device)

    def step() -> None:
        train_step(model, images, tokens)

    timed(step, device)  # warm-up: allocates the gradients and any library workspaces
    if measure == "memory":
        return {"peak_bytes": peak_step_memory(step, device)}
    seconds = [timed(step, device) for _ in range(steps)]
    return {"step_seconds": statistics.median(seconds), "all_step_seconds": seconds, "threads": torch.get_num_threads()}


def spawn_worker(args: argparse.Namespace, case: str, measure: str) -> Dict[str, Any]:
    command = [sys.executable, __file__, "--worker", case, "--measure", measure]
    command += ["--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, **(MEMORY_WORKER_ENV if measure == "memory" else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {case!r} ({measure}) failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe_machine() -> Dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        **describe_host(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "memory_metric": "torch.cuda.max_memory_allocated" if cuda else "VmHWM (peak RSS)",
    }


def format_table(cases: Dict[str, Dict[str, Any]]) -> str:
    rows = [f"{'checkpointing':<14}{'peak MiB':>10}{'step s':>10}"]
    for case, result in cases.items():
        rows.append(f"{case:<14}{result['peak_bytes'] / 2**20:>10.0f}{result['step_seconds']:>10.2f}")
    return "\n".join(rows)


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vitb32", help="a conf/model name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case, after one warm-up step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grad_checkpointing.json"))
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=MEASURES, default="time", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        result = run_worker(args.model, args.batch, args.steps, CASES[args.worker], args.measure, args.threads)
        print(json.dumps(result))
        return
    cases = {case: {**spawn_worker(args, case, "time"), **spawn_worker(args, case, "memory")} for case in CASES}
    result = {
        "machine": describe_machine(),
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "cases": cases,
        "memory_ratio": cases["off"]["peak_bytes"] / cases["on"]["peak_bytes"],
        "time_ratio": cases["on"]["step_seconds"] / cases["off"]["step_seconds"],
    }
    print(f"{args.model}, batch {args.batch}, on {result['machine']['device']} ({result['machine']['cpu']})")
    print(format_table(cases))
    print(f"memory off/on: {result['memory_ratio']:.2f}x   time on/off: {result['time_ratio']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
