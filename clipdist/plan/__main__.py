"""What fits: a per-GPU memory budget by component, the chosen micro-batch × accumulation × loss,
the step time it implies, and the largest global batch that fits.

    python -m clipdist.plan +experiment=vitl14 launch.nodes=32 launch.gpus_per_node=8 \\
        launch.gpu_memory_gb=80 train.global_batch=16777216 [--json] [--mfu 0.4] [--fixed]

World size = launch.nodes × launch.gpus_per_node; memory per rank = launch.gpu_memory_gb (GiB).
The step time is the hardware FLOPs of one rank's step at --mfu of the peak dense bf16 FLOP/s
(logging.peak_tflops, default an H100's 989). --fixed keeps the config's loss.impl and
model.grad_checkpointing instead of choosing them. Exit status 1 when nothing fits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

from clipdist.config import Config, ConfigError, load_config
from clipdist.plan.choose import Device, DoesNotFit, Plan, choose, largest_global_batch
from clipdist.plan.memory import GIB, activations, inputs, loss_buffers

DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (clipdist.perf.PEAK_TFLOPS)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clipdist.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation the step time assumes (default 0.4)")
    parser.add_argument("--fixed", action="store_true", help="keep loss.impl and model.grad_checkpointing as configured")
    parser.add_argument("--config-dir", help="a folder of your own configs, searched beside clipdist's (as Hydra's --config-dir)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for clipdist.train")
    return parser.parse_args(argv)


def device_of(cfg: Config, mfu: float) -> Device:
    if cfg.launch.gpu_memory_gb is None:
        raise ConfigError("launch.gpu_memory_gb: the planner needs each GPU's memory, e.g. launch.gpu_memory_gb=80")
    return Device(memory_bytes=int(cfg.launch.gpu_memory_gb * GIB), kind="cuda", peak_tflops=cfg.logging.peak_tflops or DEFAULT_PEAK_TFLOPS, mfu=mfu)


def target_batch(cfg: Config, world_size: int) -> int:
    if cfg.train.global_batch is not None:
        return cfg.train.global_batch
    accum = cfg.train.accum_steps if isinstance(cfg.train.accum_steps, int) else 1
    local = cfg.data.local_batch if isinstance(cfg.data.local_batch, int) else 1
    return local * world_size * accum


def alternatives(cfg: Config, plan: Plan) -> Dict[str, Any]:
    """What the other choices would cost at the chosen shape: activations per micro-batch with
    and without checkpointing (and FLIP), and each loss implementation's buffers."""
    shape, model = plan.shape, cfg.model
    out: Dict[str, Any] = {"activations_per_micro_batch": {}, "loss_buffers": {}}
    flips = sorted({model.patch_dropout, 0.5} if model.vision.arch == "vit" else {model.patch_dropout})
    for flip in flips:
        for checkpointing in (False, True):
            acts = activations(replace(model, patch_dropout=flip), replace(shape, grad_checkpointing=checkpointing))
            key = f"checkpointing {'on' if checkpointing else 'off'}, FLIP {flip:g}"
            out["activations_per_micro_batch"][key] = acts["saved"] + acts["working"]
    for impl in ("gather", "ring", "siglip"):
        out["loss_buffers"][impl] = loss_buffers(model, replace(shape, loss_impl=impl))
    return out


def describe(cfg: Config, plan: Plan, largest: int, world_size: int) -> Dict[str, Any]:
    shape, budget = plan.shape, plan.budget
    return {
        "model": cfg.model.name,
        "world_size": world_size,
        "nodes": cfg.launch.nodes,
        "gpus_per_node": cfg.launch.gpus_per_node,
        "gpu_memory_bytes": plan.device.memory_bytes,
        "zero_stage": shape.zero_stage,
        "precision": shape.precision,
        "global_batch": shape.global_batch,
        "micro_batch": shape.micro_batch,
        "accum_steps": shape.accum_steps,
        "loss_impl": shape.loss_impl,
        "grad_checkpointing": shape.grad_checkpointing,
        "patch_dropout": cfg.model.patch_dropout,
        "components_bytes": budget.components,
        "peaks_bytes": budget.peaks,
        "peak_bytes": budget.peak,
        "peak_phase": budget.peak_phase,
        "fits": plan.fits,
        "step_hardware_flops_per_gpu": plan.flops_per_rank,
        "peak_tflops": plan.device.peak_tflops,
        "mfu": plan.device.mfu,
        "step_seconds": plan.step_seconds,
        "largest_global_batch": largest,
        # The loader holds the step's images (fp32) until GradCache's second pass.
        "host_inputs_bytes_per_rank": inputs(cfg.model, replace(shape, device="cpu")),
        "alternatives_bytes": alternatives(cfg, plan),
    }


def gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def print_plan(report: Dict[str, Any]) -> None:
    r = report
    print(f"{r['model']} on {r['nodes']} node(s) × {r['gpus_per_node']} GPU(s) = {r['world_size']} ranks, "
          f"{r['gpu_memory_bytes'] / GIB:.0f} GiB each, ZeRO-{r['zero_stage']} {r['precision']}")  # fmt: skip
    print(f"global batch {r['global_batch']:,} = micro-batch {r['micro_batch']} × {r['accum_steps']} accumulation × {r['world_size']} ranks; "
          f"{r['loss_impl']} loss, checkpointing {'on' if r['grad_checkpointing'] else 'off'}, FLIP {r['patch_dropout']:g}")  # fmt: skip
    print("memory per GPU (GiB):")
    for name, value in r["components_bytes"].items():
        if value:
            print(f"  {name:<38}{gib(value)}")
    for phase, value in r["peaks_bytes"].items():
        print(f"  peak, {phase:<32}{gib(value)}")
    verdict = "fits" if r["fits"] else "does NOT fit"
    print(f"  peak {r['peak_bytes'] / GIB:.2f} of {r['gpu_memory_bytes'] / GIB:.0f} GiB ({r['peak_phase']}): {verdict}")
    alt = r["alternatives_bytes"]
    print("  activations per micro-batch: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in alt["activations_per_micro_batch"].items()))
    print("  loss buffers at this shape: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in alt["loss_buffers"].items()))
    if r["step_seconds"] is not None:
        print(f"step: {r['step_hardware_flops_per_gpu']:.3g} FLOPs per GPU ≈ {r['step_seconds']:.1f} s at {r['mfu']:.0%} MFU of {r['peak_tflops']:g} TFLOP/s")
    print(f"host memory per rank: the step's inputs, {r['host_inputs_bytes_per_rank'] / GIB:.1f} GiB (fp32 images, held for GradCache's second pass)")
    print(f"largest global batch that fits (this micro-batch, loss and checkpointing): {r['largest_global_batch']:,}")


def plan_command(cfg: Config, mfu: float, fixed: bool) -> Dict[str, Any]:
    world_size = cfg.launch.nodes * cfg.launch.gpus_per_node
    device = device_of(cfg, mfu)
    plan = choose(cfg, world_size, target_batch(cfg, world_size), device, choose_loss=not fixed, choose_checkpointing=not fixed)
    return describe(cfg, plan, largest_global_batch(cfg, world_size, device, plan), world_size)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        cfg, _ = load_config(args.overrides, extra_config_dir=args.config_dir)
        report = plan_command(cfg, args.mfu, args.fixed)
    except (ConfigError, DoesNotFit) as error:
        print(f"clipdist: {'config error' if isinstance(error, ConfigError) else 'does not fit'}: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_plan(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

