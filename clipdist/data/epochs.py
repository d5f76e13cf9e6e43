"""One rank's training data, epoch after epoch: the batches, what was skipped and mixed so far,
and the position a checkpoint stores so that a resumed run reads exactly what the uninterrupted
run would have read next.

Batch contents are a pure function of the plan (pipeline.py), so the position is small: epoch and
next batch, the layout the epoch was planned for (ranks, accumulation, workers), and what it must
be read with (seed, local and global batch, shuffle, shards). A launch with another layout reads
the rest of that epoch as planned (ReslicedLoader: elastic resume). The per-stream shard and
sample offsets are stored too, for people and as a cross-check.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from clipdist.config import ConfigError, DataConfig, train_sources
from clipdist.data.counts import SourceCounts, load_cached_counts, save_cached_counts
from clipdist.data.pipeline import SKIP_REASONS, Batch, TrainLoader, build_train_loader, check_sources_readable, count_sources, start_loader_forkserver
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


@dataclass(frozen=True)
class Layout:
    """What an epoch's batches were dealt for: its world size, accumulation and loader workers
    (a plan is a pure function of these, the seed and the data)."""

    world_size: int
    accum_steps: int
    num_workers: int


class ReslicedLoader:
    """The rest of an epoch planned for another layout, read by this launch's ranks so that every
    step trains exactly the planned global batch (elastic resume; the same data.local_batch).

    The planned step is world × accum micro-batch slots, slot j = (rank j // accum, micro-batch
    j % accum). This launch's rank p trains slots p·accum' .. (p+1)·accum' - 1 of it, reading the
    planned ranks that hold them (a planned rank split between two ranks here is read by both)."""

    def __init__(self, planned: Layout, own: Layout, rank: int, start_step: int, build: Callable[[int, Layout, int], TrainLoader]):
        self.planned, self.own, self.rank, self.start_step = planned, own, rank, start_step
        self.slots = range(rank * own.accum_steps, (rank + 1) * own.accum_steps)
        # Planned rank -> its loader from this step on (its micro-batches start_step·accum on).
        self.loaders = {r: build(r, planned, start_step * planned.accum_steps) for r in sorted({j // planned.accum_steps for j in self.slots})}
        first = next(iter(self.loaders.values()))
        self.steps = len(first) // planned.accum_steps
        self.dropped = first.dropped

    def __len__(self) -> int:
        return self.steps * self.own.accum_steps

    def __iter__(self) -> Iterator[Batch]:
        streams = {r: iter(loader) for r, loader in self.loaders.items()}
        for _ in range(self.start_step, self.steps):
            step = {r: [next(stream) for _ in range(self.planned.accum_steps)] for r, stream in streams.items()}
            for j in self.slots:
                yield step[j // self.planned.accum_steps][j % self.planned.accum_steps]


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
        resume_inexact: bool = False,
    ):
        self.cfg, self.rank, self.world_size, self.seed, self.accum_steps = cfg, rank, world_size, seed, accum_steps
        if cfg.num_workers:
            start_loader_forkserver()  # its imports overlap counting shards and building the model
        self.resume_inexact = resume_inexact  # train.resume_inexact
        self.image_size, self.context_length = image_size, context_length
        self.sources = train_sources(cfg)
        counted = computed_on_rank_zero(lambda: plan_sources(cfg, image_size, seed, counts_file))
        self.shards = [c.shards for c in counted]
        # Shards found missing or cut while counting them (no index): their lost samples are unknown.
        self.counting_problems = Counter(problem for c in counted for problem in c.problems.values())
        self.fingerprint = dataset_fingerprint(self.sources, self.shards)
        self.stats = DataStats([s.name for s in self.sources])
        self.epoch, self.next_batch = 0, 0
        self.layout = Layout(world_size, accum_steps, cfg.num_workers)
        # The layout the current epoch was planned for: a checkpoint's, for the rest of its epoch
        # when this launch has another world size (elastic resume), else this launch's.
        self.epoch_layout = self.layout
        self.loader: Optional[TrainLoader | ReslicedLoader] = None
        self.keys_file = keys_file

    def build_loader(self, epoch: int, start: int) -> TrainLoader | ReslicedLoader:
        """This rank's loader of ``epoch`` from its micro-batch ``start`` (a step boundary) on."""
        if self.epoch_layout == self.layout:
            return self.planned_loader(epoch, self.rank, self.layout, start)
        step = start // self.accum_steps
        return ReslicedLoader(self.epoch_layout, self.layout, self.rank, step, lambda rank, layout, first: self.planned_loader(epoch, rank, layout, first))

    def planned_loader(self, epoch: int, rank: int, layout: Layout, start: int) -> TrainLoader:
        return build_train_loader(
            dataclasses.replace(self.cfg, num_workers=layout.num_workers),
            image_size=self.image_size,
            context_length=self.context_length,
            rank=rank,
            world_size=layout.world_size,
            seed=self.seed,
            epoch=epoch,
            start_step=start,
            accum_steps=layout.accum_steps,
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
            self.epoch_layout = self.layout  # the next epoch is an ordinary one of this launch

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
        """What a position is only valid with: the same samples in the same global batches. The
        world size, accumulation and workers may change (the rest of the epoch is resliced)."""
        return {
            "mode": self.cfg.mode,
            "seed": self.seed,
            "local_batch": self.cfg.local_batch,
            "global_batch": self.cfg.local_batch * self.world_size * self.accum_steps,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "samples_per_epoch": self.cfg.samples_per_epoch,
            "dataset": self.fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        loader = self.build_loader(self.epoch, self.next_batch)  # a plan only: nothing is read
        step = self.next_batch // self.accum_steps
        state = {
            "version": POSITION_VERSION,
            **self.shape(),
            "rank": self.rank,
            "world_size": self.world_size,
            "accum_steps": self.accum_steps,
            "num_workers": self.cfg.num_workers,
            "epoch": self.epoch,
            "layout": dataclasses.asdict(self.epoch_layout),  # the plan of this epoch
            "next_batch": step * self.epoch_layout.accum_steps,  # in that plan's micro-batches
            "batches_per_epoch": len(loader),
            "stats": self.stats.state_dict(),
        }
        if isinstance(loader, TrainLoader):  # where each stream stands, for people and a cross-check (not resliced)
            state["streams"] = [loader.plan.describe_stream(s) for s in range(loader.plan.num_streams)]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position, on this launch's world size; anything that would map
        it onto other samples or other global batches is an error naming what changed."""
        if state.get("version") != POSITION_VERSION:
            raise ValueError(f"data position: version {state.get('version')} is not {POSITION_VERSION}")
        layout = Layout(**state["layout"]) if "layout" in state else Layout(state["world_size"], state["accum_steps"], state["num_workers"])
        saved = {**state, "global_batch": state["local_batch"] * layout.world_size * layout.accum_steps}
        changed = ", ".join(f"{key} {saved.get(key)!r} → {value!r}" for key, value in self.shape().items() if saved.get(key) != value)
        self.stats.load_state_dict(state["stats"])
        if changed and self.resume_inexact:
            logger.warning("data: the checkpoint's data position does not fit this run (%s); train.resume_inexact: epoch %d is left unfinished, continuing with epoch %d", changed, state["epoch"], state["epoch"] + 1)
            self.epoch, self.next_batch = state["epoch"] + 1, 0
            return
        if changed:  # the config differs from the checkpoint's: one line (exit 2), not a traceback
            raise ConfigError(
                f"train.resume: the checkpoint's data position does not fit this run ({changed}); a mid-epoch position "
                "carries over with the same mode, seed, data.local_batch, global batch (train.accum_steps=auto keeps it on "
                "another world size), shuffle buffer and shards; train.resume_inexact=true continues with the next epoch instead"
            )
        self.epoch, self.epoch_layout = state["epoch"], layout
        self.next_batch = state["next_batch"] // layout.accum_steps * self.accum_steps
        if "streams" in state and layout == self.layout and self.state_dict()["streams"] != state["streams"]:
            raise ValueError(f"train.resume: the data position's streams differ on recomputation: {self.state_dict()['streams']} vs {state['streams']}")
        if layout != self.layout:
            logger.info(
                "data: resuming epoch %d at step %d, planned for %d rank(s) × %d accumulation × %d workers, read by this launch's %d × %d × %d",
                self.epoch, self.next_batch // self.accum_steps, layout.world_size, layout.accum_steps, layout.num_workers,
                self.world_size, self.accum_steps, self.cfg.num_workers,
            )
        logger.info("data: resuming epoch %d at batch %d", self.epoch, self.next_batch)
