"""Evaluate a model on every configured eval set, without training.

    torchrun --nproc_per_node 8 -m clipdist.evaluate +experiment=vitb32 model.pretrained=ViT-B-32.pt \\
        'eval.zero_shot=[{name: imagenet, urls: "/data/imagenet-val/{0000..0063}.tar", classnames: /data/imagenet-val/classnames.txt}]'
    python -m clipdist.evaluate +experiment=digits train.resume=latest

The weights: ``model.pretrained`` (an OpenAI or OpenCLIP file), else the clipdist checkpoint
named by ``train.resume`` (``latest``: the newest under <train.output_dir>/checkpoints), else
the seeded random initialisation. The images and prompts are split over all ranks, as in
training. Rank 0 prints a table and writes <train.output_dir>/eval.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from clipdist.cli import start
from clipdist.config import Config, ConfigError
from clipdist.data import ensure_data
from clipdist.distributed import DistEnv, barrier, destroy_distributed, init_distributed
from clipdist.engine import Checkpointer
from clipdist.eval import EvalShape, run_evals
from clipdist.fileio import write_text_atomically
from clipdist.models import CLIP, build_model, load_pretrained

log = logging.getLogger("clipdist")

# Where DeepSpeed keeps the full module weights of a ZeRO 0-2 checkpoint.
MODULE_STATES = "mp_rank_00_model_states.pt"


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = start(argv, training=False, check=require_eval_sets)
    if isinstance(started, int):
        return started
    env, cfg, _ = started
    evaluate(cfg, env)
    return 0


def require_eval_sets(cfg: Config) -> None:
    if not cfg.eval.zero_shot and not cfg.eval.retrieval:
        raise ConfigError("eval.zero_shot: nothing to evaluate (eval.zero_shot and eval.retrieval are both empty)")


def evaluate(cfg: Config, env: DistEnv) -> Dict[str, Any]:
    """Every eval set of ``cfg.eval``; returns (on every rank) what eval.json holds."""
    init_distributed(env, socket_ifname=cfg.launch.socket_ifname)
    try:
        device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if env.rank == 0:
            ensure_data(cfg.data)  # the digits shards, on first use
        barrier()
        model, weights = load_model(cfg, env.rank)
        started = time.perf_counter()
        shape = EvalShape(cfg.model.vision.image_size, cfg.model.text.context_length, env.rank, env.world_size, device)
        report = run_evals(cfg.eval, model.to(device), shape)
        result = {
            "model": cfg.model.name,
            "weights": weights,
            "world_size": env.world_size,
            "eval_seconds": round(time.perf_counter() - started, 3),
            **report.as_json(),
        }
        if env.rank == 0:
            print(format_table(report.metrics), flush=True)
            write_eval_json(result, Path(cfg.train.output_dir))
        return result
    finally:
        destroy_distributed()


def load_model(cfg: Config, rank: int) -> tuple[CLIP, str]:
    """The model to evaluate and a description of its weights."""
    torch.manual_seed(cfg.train.seed)  # a random init must be the same on every rank
    model = build_model(cfg.model)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
        return model, f"model.pretrained={cfg.model.pretrained}"
    path = Checkpointer(Path(cfg.train.output_dir) / "checkpoints", rank).resolve(cfg.train.resume)
    if path is not None:
        load_checkpoint_module(model, path)
        return model, f"checkpoint {path}"
    log.warning("evaluating the random initialisation (seed %d): set model.pretrained or train.resume for trained weights", cfg.train.seed)
    return model, f"random init (train.seed={cfg.train.seed})"


def load_checkpoint_module(model: CLIP, checkpoint: Path) -> None:
    """The module weights of a clipdist (DeepSpeed) checkpoint directory, ZeRO stage 0-2."""
    file = checkpoint / MODULE_STATES
    if not file.is_file():
        raise FileNotFoundError(f"train.resume: {checkpoint} has no {MODULE_STATES}; is it a clipdist checkpoint directory?")
    # DeepSpeed pickles its own objects beside the tensors, so this file needs a full unpickle:
    # load only checkpoints you wrote.
    states = torch.load(file, map_location="cpu", weights_only=False)
    try:
        model.load_state_dict(states["module"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise ValueError(
            f"train.resume: {file} does not fit the model config ({first}); "
            "a ZeRO-3 checkpoint needs DeepSpeed's zero_to_fp32.py first"
        ) from None


def format_table(metrics: Dict[str, float]) -> str:
    """Set, metric, value: accuracies and recalls in percent, counts as integers."""
    rows = [("eval set", "metric", "value")]
    for key, value in metrics.items():
        _, name, metric = key.split("/", 2)
        shown = f"{value:d}" if isinstance(value, int) else f"{100 * value:.2f} %"
        rows.append((name, metric, shown))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>9}" for a, b, c in rows)


def write_eval_json(result: Dict[str, Any], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    log.info("eval: %s", run_dir / "eval.json")


if __name__ == "__main__":
    sys.exit(main())
