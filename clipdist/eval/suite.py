"""Every configured eval set, on all ranks: what train.py runs every eval.every_steps and at the
end, and what ``python -m clipdist.evaluate`` runs alone.

Metrics are named ``eval/<set>/<metric>``: top1, top5, per_class_top1 (the mean of the
per-class top-1 accuracies) and count for a zero-shot set; image_to_text_R@{1,5,10},
text_to_image_R@{1,5,10}, images and captions for a retrieval set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from clipdist.config import EvalConfig, RetrievalSetConfig, ZeroShotSetConfig
from clipdist.data import build_eval_loader
from clipdist.eval.embed import rank0_buffers
from clipdist.eval.retrieval import RECALL_AT, retrieval_eval
from clipdist.eval.retrieval_data import build_captioned_loader
from clipdist.eval.sets import resolve_zero_shot_set
from clipdist.eval.zero_shot import build_classifier, zero_shot_eval
from clipdist.models import tokenize

log = logging.getLogger("clipdist")


@dataclass
class EvalReport:
    metrics: Dict[str, float] = field(default_factory=dict)  # eval/<set>/<metric>: scalars for wandb
    per_class: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)  # zero-shot set → class → top-1

    def as_json(self) -> Dict[str, Any]:
        return {"metrics": self.metrics, "per_class_top1": self.per_class}


@dataclass(frozen=True)
class EvalShape:
    """What the evaluation needs to know of the model and the launch."""

    image_size: int
    context_length: int
    rank: int
    world_size: int
    device: torch.device


def run_evals(cfg: EvalConfig, model: nn.Module, shape: EvalShape) -> EvalReport:
    """Collective: every rank calls it with the same config; every rank gets the same report."""
    report = EvalReport()
    with rank0_buffers(model):
        for i, eval_set in enumerate(cfg.zero_shot):
            run_zero_shot(cfg, eval_set, i, model, shape, report)
        for eval_set in cfg.retrieval:
            run_retrieval(cfg, eval_set, model, shape, report)
    return report


def run_zero_shot(cfg: EvalConfig, eval_set: ZeroShotSetConfig, index: int, model: nn.Module, shape: EvalShape, report: EvalReport) -> None:
    started = time.perf_counter()
    resolved = resolve_zero_shot_set(eval_set, f"eval.zero_shot[{index}]")
    classnames, templates = resolved.classnames, resolved.templates
    classifier = build_classifier(
        model, tokenize, classnames, templates, shape.device, context_length=shape.context_length, batch_size=cfg.local_batch
    )
    loader = build_eval_loader(
        resolved.urls, image_size=shape.image_size, rank=shape.rank, world_size=shape.world_size, batch_size=cfg.local_batch
    )
    result = zero_shot_eval(model, loader, classifier, shape.device)
    prefix = f"eval/{eval_set.name}"
    report.metrics.update(
        {
            f"{prefix}/top1": result["top1"],
            f"{prefix}/top5": result["top5"],
            f"{prefix}/per_class_top1": result["per_class_top1"],
            f"{prefix}/count": result["count"],
        }
    )
    report.per_class[eval_set.name] = dict(zip(classnames, result["per_class"]))
    log.info(
        "zero-shot %s: top-1 %.2f%%  top-5 %.2f%%  mean per-class top-1 %.2f%%  on %d images, %d classes × %d templates (%.1f s)",
        eval_set.name,
        100 * result["top1"],
        100 * result["top5"],
        100 * result["per_class_top1"],
        result["count"],
        len(classnames),
        len(templates),
        time.perf_counter() - started,
    )


def run_retrieval(cfg: EvalConfig, eval_set: RetrievalSetConfig, model: nn.Module, shape: EvalShape, report: EvalReport) -> None:
    started = time.perf_counter()
    loader = build_captioned_loader(
        eval_set.urls, image_size=shape.image_size, rank=shape.rank, world_size=shape.world_size, batch_size=cfg.local_batch
    )
    result = retrieval_eval(
        model, loader, tokenize, shape.device, shape.context_length, chunk=cfg.retrieval_chunk, text_batch=cfg.local_batch
    )
    report.metrics.update({f"eval/{eval_set.name}/{name}": value for name, value in result.items()})

    def recalls(direction: str) -> str:
        return "/".join(f"{100 * result[f'{direction}_R@{k}']:.1f}" for k in RECALL_AT)

    log.info(
        "retrieval %s: image→text R@%s %s%%  text→image R@%s %s%%  on %d images, %d captions (%.1f s)",
        eval_set.name,
        "/".join(map(str, RECALL_AT)),
        recalls("image_to_text"),
        "/".join(map(str, RECALL_AT)),
        recalls("text_to_image"),
        result["images"],
        result["captions"],
        time.perf_counter() - started,
    )


def summary_fields(cfg: EvalConfig, metrics: Dict[str, float]) -> Dict[str, Any]:
    """summary.json's zero_shot_top1/top5/count: those of the first zero-shot set (None without one)."""
    first = f"eval/{cfg.zero_shot[0].name}" if cfg.zero_shot else None
    return {f"zero_shot_{name}": metrics.get(f"{first}/{name}") if first else None for name in ("top1", "top5", "count")}
