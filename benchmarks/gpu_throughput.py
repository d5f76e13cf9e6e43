"""Training throughput and MFU of clipdist's ViT CLIPs on one GPU: samples/s, TFLOP/s and model-
FLOPs utilisation across local batch sizes, gradient checkpointing off/on and FLIP patch
dropout 0/0.5, in bf16 autocast.

    python benchmarks/gpu_throughput.py                                  # vitb32, vitb16, vitl14
    python benchmarks/gpu_throughput.py --models vitb16 --batches 128 256 --steps 20
    python benchmarks/gpu_throughput.py --cpu-tiny                       # no GPU: a tiny smoke run

One process, one device. Every case builds the real model (``clipdist.models.build_model``),
clipdist's loss (``build_loss``: the gathered CLIP loss, here over the local batch) and optimizer
(``clipdist.engine.build_optimizer``: torch AdamW with clipdist's parameter groups), runs
``--warmup`` steps, then times ``--steps`` steps — forward in bf16 autocast, loss in fp32,
backward, optimizer step — between two device synchronisations. The FLOPs are
``clipdist.perf.training_flops`` (model FLOPs: MFU; hardware FLOPs, with checkpointing's
recomputation, give HFU), checked per case against the tokens the image tower really sees.
A case that runs out of memory is reported as OOM, and larger batches of the same setting are
skipped. Without CUDA the script runs the tiny ViT on the CPU in fp32 with one thread
(``--cpu-tiny``, the default there) to show that it works; its MFU is empty unless
``--peak-tflops`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from _common import describe_machine, random_clip_inputs, write_result

from clipdist.config import LossConfig, ModelConfig, OptimConfig, load_config
from clipdist.engine import build_optimizer
from clipdist.losses import build_loss
from clipdist.models import build_model
from clipdist.perf import image_tokens, peak_tflops, training_flops

GPU_MODELS = ("vitb32", "vitb16", "vitl14")
GPU_BATCHES = (64, 128, 256, 512)
CPU_MODELS = ("vit_tiny",)
CPU_BATCHES = (8, 32)
PATCH_DROPOUTS = (0.0, 0.5)
CHECKPOINTING = (False, True)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    grad_checkpointing: bool
    patch_dropout: float
    batch: int


def model_config(case: Case) -> ModelConfig:
    cfg = load_config([f"model={case.model}"])[0].model
    return dataclasses.replace(cfg, grad_checkpointing=case.grad_checkpointing, patch_dropout=case.patch_dropout)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """One case's timed steps; raises torch.cuda.OutOfMemoryError when it does not fit."""
    cfg = model_config(case)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    loss_fn = build_loss(LossConfig(impl="gather"))
    images, tokens = (t.to(device) for t in random_clip_inputs(cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size, case.batch))
    seen_tokens: List[int] = []
    hook = model.visual.transformer.register_forward_pre_hook(lambda _, inputs: seen_tokens.append(inputs[0].shape[1]))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            outputs = model(images, tokens)
        loss_fn(*outputs).backward()  # the loss scores in fp32 whatever the towers' dtype
        optimizer.step()

    for _ in range(args.warmup):
        step()
    hook.remove()
    expected = image_tokens(cfg, training=True)
    if seen_tokens[0] != expected:
        return {"status": "skipped", "reason": f"the image tower saw {seen_tokens[0]} tokens, the FLOP count expects {expected} (patch dropout missing in clipdist/models/vit.py?)"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"status": "ok", **rates(cfg, case.batch * args.steps / seconds, args.peak), "step_seconds": seconds / args.steps, "peak_memory_bytes": memory}


def rates(cfg: ModelConfig, samples_per_second: float, peak: Optional[float]) -> Dict[str, Optional[float]]:
    flops = training_flops(cfg)  # the local batch is the loss's whole batch here: no logits FLOPs
    tflops = flops.model * samples_per_second / 1e12
    hardware_tflops = flops.hardware * samples_per_second / 1e12
    return {
        "samples_per_second": samples_per_second,
        "model_gflops_per_sample": flops.model / 1e9,
        "hardware_gflops_per_sample": flops.hardware / 1e9,
        "tflops": tflops,
        "mfu": None if peak is None else tflops / peak,
        "hfu": None if peak is None else hardware_tflops / peak,
    }


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    try:
        result = measure(case, args, device)
    except torch.cuda.OutOfMemoryError:
        result = {"status": "oom"}
    # Outside the except block: the traceback, and the tensors its frames hold, are gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**dataclasses.asdict(case), **result}


def run_all(args: argparse.Namespace, device: torch.device) -> List[Dict[str, Any]]:
    results: List[Dict[str, Any]] = []
    oom_at: Dict[tuple, int] = {}  # setting -> the batch that ran out of memory
    for model, checkpointing, patch_dropout in itertools.product(args.models, CHECKPOINTING, PATCH_DROPOUTS):
        setting = (model, checkpointing, patch_dropout)
        for batch in sorted(args.batches):
            case = Case(model, checkpointing, patch_dropout, batch)
            if setting in oom_at:
                result = {**dataclasses.asdict(case), "status": "skipped", "reason": f"OOM at batch {oom_at[setting]}"}
            else:
                result = run_case(case, args, device)
                if result["status"] == "oom":
                    oom_at[setting] = batch
            print(format_row(result), flush=True)
            results.append(result)
    return results


HEADER = f"{'model':<10}{'ckpt':>5}{'drop':>6}{'batch':>7}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'HFU':>7}{'peak GiB':>10}"


def format_row(result: Dict[str, Any]) -> str:
    head = f"{result['model']:<10}{'on' if result['grad_checkpointing'] else 'off':>5}{result['patch_dropout']:>6.1f}{result['batch']:>7}"
    if result["status"] != "ok":
        return f"{head}  {result['status'].upper()}{': ' + result['reason'] if 'reason' in result else ''}"
    mfu = "–" if result["mfu"] is None else f"{result['mfu']:.1%}"
    hfu = "–" if result["hfu"] is None else f"{result['hfu']:.1%}"
    memory = "–" if result["peak_memory_bytes"] is None else f"{result['peak_memory_bytes'] / 2**30:.1f}"
    return f"{head}{result['samples_per_second']:>11.1f}{result['tflops']:>9.3g}{mfu:>7}{hfu:>7}{memory:>10}"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="the tiny ViT on the CPU in fp32 (the default without CUDA)")
    parser.add_argument("--models", nargs="+", help=f"conf/model names (default: {' '.join(GPU_MODELS)}; --cpu-tiny: vit_tiny)")
    parser.add_argument("--batches", type=int, nargs="+", help=f"local batch sizes (default: {GPU_BATCHES}; --cpu-tiny: {CPU_BATCHES})")
    parser.add_argument("--steps", type=int, help="timed steps per case (default: 10; --cpu-tiny: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case first")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 autocast or fp32 (default: bf16; --cpu-tiny: fp32)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: clipdist.perf's table for the GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; --cpu-tiny: 1)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/gpu_throughput.json (--cpu-tiny: gpu_throughput_cpu.json)")
    args = parser.parse_args(argv)
    args.cpu_tiny = args.cpu_tiny or not torch.cuda.is_available()
    tiny = args.cpu_tiny
    args.models = args.models or list(CPU_MODELS if tiny else GPU_MODELS)
    args.batches = args.batches or list(CPU_BATCHES if tiny else GPU_BATCHES)
    args.steps = args.steps or (3 if tiny else 10)
    args.precision = args.precision or ("fp32" if tiny else "bf16")
    # One thread: on a shared CPU, OpenMP's spinning threads made the same step 1x-20x slower.
    args.threads = args.threads or (1 if tiny else None)
    args.out = args.out or Path(f"benchmarks/results/gpu_throughput{'_cpu' if tiny else ''}.json")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first step checks the token count), got {args.warmup}")
    if min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    return args


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu") if args.cpu_tiny else torch.device("cuda", 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.peak = peak_tflops(args.peak_tflops, device)
    machine = {**describe_machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "peak_tflops": args.peak}
    if args.cpu_tiny:
        machine["note"] = "CPU smoke run: shows the code path works; not a throughput figure (other jobs may share the cores)"
    print(f"{machine['device']} (peak {args.peak or 'unknown'} TFLOP/s), {args.precision}, {args.steps} timed steps after {args.warmup}")
    print(HEADER)
    started = time.perf_counter()
    results = run_all(args, device)
    result = {
        "machine": machine,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "cases": results,
    }
    write_result(args.out, result, started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
