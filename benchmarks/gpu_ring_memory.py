"""Peak GPU memory of clipdist's ring loss on one GPU at global batches of 32k to 256k, forward +
backward, against the memory planner's prediction (``clipdist.plan.memory.loss_buffers``).

    python benchmarks/gpu_ring_memory.py                                  # cuda: 32768 .. 262144
    python benchmarks/gpu_ring_memory.py --batches 65536 --chunk-size 1024 --out /tmp/ring.json
    python benchmarks/gpu_ring_memory.py --device cpu --batches 4096      # no GPU: a smoke run

One process, a world-size-1 process group (NCCL on a GPU, gloo on the CPU), as a one-GPU run
trains. For each global batch B: random normalised [B, d] float32 image and text embeddings that
require grad and a (1,) logit scale are made on the device, then one forward + backward of
``RingClipLoss`` (``build_loss``; tiles of ``loss.chunk_size`` columns, its default unless
--chunk-size). Measured: ``torch.cuda.max_memory_allocated`` during the step minus
``torch.cuda.memory_allocated`` before it, after ``reset_peak_memory_stats``.

Accounting: the inputs exist before the step, so the measure leaves them out and covers what
the loss adds (tiles, blocks, per-column partials) and the embeddings' gradients, which the
backward allocates. That is how ``loss_buffers`` was fitted (benchmarks/loss_memory.py, on the
CPU), so measured and predicted are compared as they are; the inputs (2·B·d·4 bytes) are
reported beside them. A small step runs first so that cuBLAS's workspace is not counted.

Results are written after every batch size (atomically), so a run cut short keeps what it
measured. A batch that runs out of memory is reported as OOM and the larger ones are skipped.
On the CPU the measure is the rise of the peak resident set (``_common.peak_rss_rise``), only
to show that the code path works: glibc's allocator makes it approximate (closer with
MALLOC_MMAP_THRESHOLD_=131072, as _common.MEMORY_WORKER_ENV explains).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import describe_machine, free_port, peak_rss_rise, write_result

from clipdist.config import LossConfig, ModelConfig
from clipdist.losses import build_loss

GPU_BATCHES = (32768, 65536, 131072, 262144)
EMBED_DIM = 512  # ViT-B/32's and ViT-B/16's embed_dim, as in benchmarks/loss_memory.py
CLIP_INIT_LOGIT_SCALE = 1 / 0.07
WARMUP_BATCH = 1024
FP32 = 4
ACCOUNTING = (
    "measured: the peak during forward + backward above what was allocated before it (the inputs); "
    "it includes the embeddings' gradients, as loss_buffers does (fitted the same way). "
    "input_bytes (image + text embeddings, 2·B·d·4) are in neither, reported apart."
)


def make_inputs(batch: int, dim: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Normalised embeddings, as the towers hand them over, and the exponentiated logit scale."""
    generator = torch.Generator(device=device).manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, device=device), dim=1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=generator, device=device), dim=1).requires_grad_()
    logit_scale = torch.full((1,), CLIP_INIT_LOGIT_SCALE, device=device, requires_grad=True)
    return image, text, logit_scale


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(loss_fn: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    loss = loss_fn(*inputs)
    loss.backward()
    return loss.item()  # waits for the device


def peak_cuda_rise(device: torch.device, run: Callable[[], object]) -> int:
    """Bytes by which ``run`` raises the caching allocator's peak above what is allocated now."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def predicted_bytes(batch: int, chunk_size: int, device: torch.device) -> Dict[str, Any]:
    """The planner's loss buffers for one rank holding the whole batch, or why there is none (an
    import error if clipdist/plan/memory.py changed: reported, not worked around)."""
    try:
        from clipdist.plan.memory import Shape, loss_buffers

        shape = Shape(
            world_size=1, micro_batch=batch, accum_steps=1, loss_impl="ring", chunk_size=chunk_size,
            grad_checkpointing=False, zero_stage=0, precision="fp32", device=device.type,
        )  # fmt: skip
        return {"predicted_bytes": int(loss_buffers(ModelConfig(embed_dim=EMBED_DIM), shape))}
    except Exception as error:  # any failure of the planner is a finding, not a crash
        return {"predicted_bytes": None, "plan_error": f"{type(error).__name__}: {error}"}


def measure(batch: int, args: argparse.Namespace, loss_fn: torch.nn.Module, device: torch.device) -> Dict[str, Any]:
    inputs = make_inputs(batch, args.dim, device)
    outcome: Dict[str, float] = {}

    def run() -> None:
        started = time.perf_counter()
        outcome["loss"] = step(loss_fn, inputs)
        outcome["seconds"] = time.perf_counter() - started

    measured = peak_cuda_rise(device, run) if device.type == "cuda" else peak_rss_rise(run)
    finite = math.isfinite(outcome["loss"]) and all(bool(torch.isfinite(t.grad).all()) for t in inputs)
    return {"status": "ok", "measured_bytes": measured, "finite_loss_and_grads": finite, **outcome}


def run_batch(batch: int, args: argparse.Namespace, loss_fn: torch.nn.Module, device: torch.device) -> Dict[str, Any]:
    row: Dict[str, Any] = {"global_batch": batch, "input_bytes": 2 * batch * args.dim * FP32}
    try:
        row.update(measure(batch, args, loss_fn, device))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    # Outside the except block: the traceback, and the tensors its frames hold, are gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row.update(predicted_bytes(batch, args.chunk_size, device))
    if row.get("measured_bytes") is not None and row.get("predicted_bytes"):
        row["ratio"] = row["measured_bytes"] / row["predicted_bytes"]
    return row


def format_row(row: Dict[str, Any]) -> str:
    head = f"{row['global_batch']:>8}"
    if row["status"] != "ok":
        return f"{head}  {row['status'].upper()}{': ' + row['reason'] if 'reason' in row else ''}"
    predicted = "–" if row["predicted_bytes"] is None else f"{row['predicted_bytes'] / 2**30:.2f}"
    ratio = "–" if "ratio" not in row else f"{row['ratio']:.2f}"
    return f"{head}{row['measured_bytes'] / 2**30:>14.2f}{predicted:>15}{ratio:>7}{row['seconds']:>9.2f}"


HEADER = f"{'batch':>8}{'measured GiB':>14}{'predicted GiB':>15}{'ratio':>7}{'seconds':>9}"


def init_group(device: torch.device) -> None:
    """World size 1 on the backend training would use; the ring then runs no collective, but the
    loss sees a process group as it does in a run."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def run_all(args: argparse.Namespace, device: torch.device, record: Callable[[List[Dict[str, Any]]], None]) -> List[Dict[str, Any]]:
    loss_fn = build_loss(LossConfig(impl="ring", chunk_size=args.chunk_size))
    step(loss_fn, make_inputs(WARMUP_BATCH, args.dim, device, seed=1))  # cuBLAS handles and workspace
    rows: List[Dict[str, Any]] = []
    oom_at: Optional[int] = None
    for batch in sorted(args.batches):
        if oom_at is not None:
            row = {"global_batch": batch, "status": "skipped", "reason": f"OOM at batch {oom_at}"}
        else:
            row = run_batch(batch, args, loss_fn, device)
            oom_at = batch if row["status"] == "oom" else None
        print(format_row(row), flush=True)
        rows.append(row)
        record(rows)
    return rows


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the code path")
    parser.add_argument("--batches", type=int, nargs="+", default=list(GPU_BATCHES), help="global batch sizes (one rank holds all)")
    parser.add_argument("--chunk-size", type=int, default=LossConfig().chunk_size, help="columns per logits tile (default: loss.chunk_size's)")
    parser.add_argument("--dim", type=int, default=EMBED_DIM, help=argparse.SUPPRESS)  # the planner's model has embed_dim 512
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_ring_memory.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False (use --device cpu for a smoke run)")
    if min(args.batches) < 1 or args.chunk_size < 1:
        parser.error("--batches and --chunk-size must be >= 1")
    return args


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    started = time.perf_counter()
    machine = {**describe_machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    header = {"machine": machine, "embed_dim": args.dim, "chunk_size": args.chunk_size, "precision": "fp32", "accounting": ACCOUNTING}
    if device.type == "cpu":
        header["note"] = "CPU smoke run: peak RSS rise, approximate (glibc's allocator); not a check of the plan"
    print(f"{machine['device']}: ring loss, d={args.dim}, chunk_size={args.chunk_size}, fp32")
    print(HEADER)
    init_group(device)
    try:
        run_all(args, device, lambda rows: write_result(args.out, {**header, "cases": rows}, started))
    finally:
        dist.destroy_process_group()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
