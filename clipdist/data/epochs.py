"""One rank's training data, epoch after epoch: the batches, what was skipped and mixed so far,
and the position a checkpoint stores so that a resumed run reads exactly what the uninterrupted
run would have read next.

Batch contents are a pure function of the plan (pipeline.py), so the position is small: epoch and
next batch, plus what it must be read with (seed, ranks, workers, batch, shuffle, shards). The
per-stream shard and sample offsets are stored too, for people and as a cross-check.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from clipdist.config import ConfigError, DataConfig, train_sources
from clipdist.data.counts import SourceCounts, load_cached_counts, save_cached_counts
from clipdist.data.pipeline import SKIP_REASONS, Batch, TrainLoader, build_train_loader, check_sources_readable, count_sources
from clipdist.data.sources import dataset_fingerprint
from clipdist.distributed import computed_on_rank_zero

logger = logging.getLogger(__name__)

POSITION_VERSION = 1


class DataStats:
    """Rows replaced (by reason) and rows trained per source, on this rank, since the run began."""

    def __init__(self, source_names: list[str]):
        self.source_names = source_names
        self.skipped: Counter = Counter()
        self.rows: Counter = Counter()  # by source index

    def add(self, batch: Batch) -> None:
        self.skipped.update(batch.skipped)
        self.rows.update(batch.sources)

    def vector(self) -> torch.Tensor:
        values = [self.skipped[r] for r in SKIP_REASONS] + [self.rows[i] for i in range(len(self.source_names))]
        return torch.tensor(values, dtype=torch.float64)

    def global_metrics(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Counts over all ranks (a collective): data/skipped/<reason>, data/mix/<source> (share
        of the rows trained), data/rows."""
        total = all_reduce_sum(self.vector()).tolist()
        skipped, rows = total[: len(SKIP_REASONS)], total[len(SKIP_REASONS) :]
        metrics = {f"data/skipped/{reason}": n for reason, n in zip(SKIP_REASONS, skipped)}
        metrics["data/rows"] = sum(rows)
        for name, n in zip(self.source_names, rows):
            metrics[f"data/mix/{name}"] = n / max(sum(rows), 1)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), "rows": {self.source_names[i]: n for i, n in self.rows.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = Counter(state["skipped"])
        self.rows = Counter({self.source_names.index(name): n for name, n in state["rows"].items()})


def describe_counts(metrics: dict[str, float]) -> str:
    """One log line from global_metrics."""
    skipped = [f"{k.split('/')[-1]} {int(v)}" for k, v in metrics.items() if k.startswith("data/skipped/") and v]
    mix = [f"{k.split('/')[-1]} {100 * v:.1f}%" for k, v in metrics.items() if k.startswith("data/mix/")]
    line = f"{int(metrics['data/rows'])} rows trained; replaced: {', '.join(skipped) or 'none'}; mix: {', '.join(mix)}"
    counting = [f"{k.split('/')[-1]} {int(v)}" for k, v in metrics.items() if k.startswith("data/counting/")]
    return line + (f"; shards found bad when counted: {', '.join(counting)}" if counting else "")


def plan_sources(cfg: DataConfig, image_size: int, seed: int, counts_file: Optional[Path]) -> list[SourceCounts]:
    """Every source's shards with their counts, and a check that each source can be read at all.
    Run by rank 0 alone (computed_on_rank_zero); counts found by reading shards or per-shard stats
    files are kept in ``counts_file``, so a requeued or resumed run does not look again."""
    cache = load_cached_counts(counts_file)
    counted = count_sources(cfg, cache)
    for c in counted:
        cache.update(c.newly_counted)
    save_cached_counts(counts_file, cache)
    check_sources_readable(cfg, [c.shards for c in counted], image_size, seed)
    return counted


class TrainData:
    """Endless batches of one rank, epoch after epoch, from a saved position or the start.

    After the consumer has received batch i of epoch e, ``position()`` is (e, i + 1): exactly
    what a checkpoint taken at that moment must resume from."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        image_size: int,
        context_length: int,
        rank: int,
        world_size: int,
        seed: int,
        accum_steps: int = 1,
        keys_file: Optional[Path] = None,
        counts_file: Optional[Path] = None,
    ):
        self.cfg, self.rank, self.world_size, self.seed, self.accum_steps = cfg, rank, world_size, seed, accum_steps
        self.image_size, self.context_length = image_size, context_length
        self.sources = train_sources(cfg)
        counted = computed_on_rank_zero(lambda: plan_sources(cfg, image_size, seed, counts_file))
        self.shards = [c.shards for c in counted]
        # Shards found missing or cut while counting them (no index): their lost samples are unknown.
        self.counting_problems = Counter(problem for c in counted for problem in c.problems.values())
        self.fingerprint = dataset_fingerprint(self.sources, self.shards)
        self.stats = DataStats([s.name for s in self.sources])
        self.epoch, self.next_batch = 0, 0
        self.loader: Optional[TrainLoader] = None
        self.keys_file = keys_file

    def build_loader(self, epoch: int, start: int) -> TrainLoader:
        return build_train_loader(
            self.cfg,
            image_size=self.image_size,
            context_length=self.context_length,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
            start_step=start,
            accum_steps=self.accum_steps,
            shards=self.shards,
        )

    def __iter__(self) -> Iterator[Batch]:
        announced = False
        while True:
            self.loader = self.build_loader(self.epoch, self.next_batch)
            if self.loader.dropped and self.rank == 0:
                # The same count every epoch, only which samples changes: say it once per process.
                logger.log(
                    logging.DEBUG if announced else logging.INFO,
                    "epoch %d: %d samples dropped, less than one global batch of %d (exact mode; which ones changes "
                    "every epoch with the shard order)",
                    self.epoch, self.loader.dropped, self.cfg.local_batch * self.world_size * self.accum_steps,
                )
                announced = True
            for batch in self.loader:
                self.next_batch += 1
                self.stats.add(batch)
                self.record_keys(batch)
                yield batch
            self.epoch, self.next_batch = self.epoch + 1, 0

    def global_metrics(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """DataStats.global_metrics (a collective), plus data/counting/<problem>: shards found
        missing or truncated while counting them, whose lost samples nobody can know."""
        metrics = self.stats.global_metrics(all_reduce_sum)
        metrics.update({f"data/counting/{problem}": n for problem, n in sorted(self.counting_problems.items())})
        return metrics

    def record_keys(self, batch: Batch) -> None:
        if self.keys_file is None:
            return
        self.keys_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.keys_file, "a") as f:
            f.write(f"{self.epoch} {self.next_batch - 1} {' '.join(batch.keys)}\n")

    # -- position ------------------------------------------------------------------------------

    def shape(self) -> dict[str, Any]:
        """What a position is only valid with."""
        return {
            "mode": self.cfg.mode,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "local_batch": self.cfg.local_batch,
            "accum_steps": self.accum_steps,
            "num_workers": self.cfg.num_workers,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "samples_per_epoch": self.cfg.samples_per_epoch,
            "dataset": self.fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        loader = self.build_loader(self.epoch, self.next_batch)  # a plan only: nothing is read
        plan = loader.plan
        return {
            "version": POSITION_VERSION,
            **self.shape(),
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "batches_per_epoch": len(loader),
            "streams": [plan.describe_stream(s) for s in range(plan.num_streams)],
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; anything that would map it onto other samples is an
        error naming what changed."""
        if state.get("version") != POSITION_VERSION:
            raise ValueError(f"data position: version {state.get('version')} is not {POSITION_VERSION}")
        changed = [f"{key} {state.get(key)!r} → {value!r}" for key, value in self.shape().items() if state.get(key) != value]
        if changed:  # the config differs from the checkpoint's: one line (exit 2), not a traceback
            raise ConfigError(
                "train.resume: the checkpoint's data position does not fit this run ("
                + ", ".join(changed)
                + "); a mid-epoch position only carries over with the same mode, seed, world size, "
                "local batch, accumulation, data.num_workers, shuffle buffer and shards"
            )
        self.epoch, self.next_batch = state["epoch"], state["next_batch"]
        self.stats.load_state_dict(state["stats"])
        streams = self.state_dict()["streams"]
        if streams != state["streams"]:
            raise ValueError(f"train.resume: the data position's streams differ on recomputation: {streams} vs {state['streams']}")
        logger.info("data: resuming epoch %d at batch %d", self.epoch, self.next_batch)
