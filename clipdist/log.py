"""Metrics: wandb (offline by default), a local metrics.jsonl, and progress lines — rank 0 only."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict

from clipdist.config import LoggingConfig

log = logging.getLogger("clipdist")


def setup_console_logging(rank: int) -> None:
    """Clean progress lines from rank 0; other ranks, and other libraries, speak only for warnings."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class MetricLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: Dict[str, Any], rank: int, resuming: bool = False):
        self.cfg = cfg
        self.enabled = rank == 0
        self.run = None
        self.metrics_file = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the metrics of the run it resumes; a new run starts them afresh.
        self.metrics_file = open(run_dir / "metrics.jsonl", "a" if resuming else "w")
        if cfg.wandb_mode != "disabled":
            self.run = self._start_wandb(run_dir, config)

    def _start_wandb(self, run_dir: Path, config: Dict[str, Any]):
        import wandb

        # Keep wandb quiet on the console; its files still land in run_dir/wandb.
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=self.cfg.project,
            name=self.cfg.run_name,
            mode=self.cfg.wandb_mode,
            dir=str(run_dir),
            config=config,
            reinit=True,
        )

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def progress(self, step: int, max_steps: int, metrics: Dict[str, float]) -> None:
        """One console line: train/ and perf/ metrics, and the data/ counts as one number."""
        shown = [f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items() if not k.startswith("data/")]
        if "data/epoch" in metrics:
            shown.append(f"epoch {metrics['data/epoch']:.0f}")
        if "data/skipped/padded" in metrics:
            shown.append(f"rows replaced {metrics['data/skipped/padded']:.0f}")
        log.info("step %*d/%d  %s", len(str(max_steps)), step, max_steps, "  ".join(shown))

    def summary(self, values: Dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.run is not None:
            self.run.finish()
