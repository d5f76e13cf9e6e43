"""Evaluate a model on every configured eval set, without training.

    torchrun --nproc_per_node 8 -m clipdist.evaluate +experiment=vitb32 model.pretrained=ViT-B-32.pt \\
        'eval.zero_shot=[{name: imagenet, urls: "/data/imagenet-val/{0000..0063}.tar", classnames: /data/imagenet-val/classnames.txt}]'
    python -m clipdist.evaluate +experiment=digits train.resume=latest

The weights: ``model.pretrained`` (an OpenAI or OpenCLIP file), else the clipdist checkpoint
named by ``train.resume`` (``latest``: the newest under <train.output_dir>/checkpoints; any ZeRO
stage, read as clipdist.export reads it), else the seeded random initialisation. The images and prompts are split over all ranks, as in
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

from clipdist.cli import refuse, start
from clipdist.config import Config, ConfigError
from clipdist.data import ensure_data
from clipdist.distributed import DistEnv, barrier, destroy_distributed, init_distributed
from clipdist.engine import Checkpointer
from clipdist.engine.checkpoint_weights import model_from_checkpoint
from clipdist.eval import EvalShape, run_evals
from clipdist.fileio import write_text_atomically
from clipdist.models import CLIP, build_model, load_pretrained

log = logging.getLogger("clipdist")


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = start(argv, training=False, check=check_inputs)
    if isinstance(started, int):
        return started
    env, cfg, _ = started
    try:
        evaluate(cfg, env)
    except ConfigError as error:  # a checkpoint that does not fit the model config: every rank finds it alike
        return refuse("config error", error)
    return 0


def check_inputs(cfg: Config) -> None:
    """Before any process group: something to evaluate, and a train.resume naming a checkpoint."""
    require_eval_sets(cfg)
    named_checkpoint(cfg)


def named_checkpoint(cfg: Config) -> Optional[Path]:
    """The clipdist checkpoint train.resume names; None without one, or when model.pretrained
    gives the weights. A ConfigError (one line) when train.resume names no checkpoint."""
    if cfg.model.pretrained:
        return None
    return Checkpointer(Path(cfg.train.output_dir) / "checkpoints", rank=0).resolve(cfg.train.resume)


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
        model, weights = load_model(cfg)
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


def load_model(cfg: Config) -> tuple[CLIP, str]:
    """The model to evaluate and a description of its weights."""
    path = named_checkpoint(cfg)
    if path is not None:
        return model_from_checkpoint(cfg.model, path), f"checkpoint {path}"
    torch.manual_seed(cfg.train.seed)  # a random init must be the same on every rank
    model = build_model(cfg.model)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained, cfg.model.pretrained_arch)
        return model, f"model.pretrained={cfg.model.pretrained}"
    log.warning("evaluating the random initialisation (seed %d): set model.pretrained or train.resume for trained weights", cfg.train.seed)
    return model, f"random init (train.seed={cfg.train.seed})"


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
