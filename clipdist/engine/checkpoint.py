"""DeepSpeed checkpoints plus the loop's own state, with an atomically written `latest` pointer.

A checkpoint directory is complete once `latest` names it: the pointer is only replaced (by
rename) after every rank has finished writing, so a crash mid-save leaves the previous one loadable.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from clipdist.fileio import write_text_atomically

log = logging.getLogger(__name__)

LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, rank: int):
        self.directory = Path(directory)
        self.rank = rank

    def save(self, engine, state: TrainState, data_position: dict) -> Path:
        """Collective: every rank must call it at the same step. Each rank's data position (its
        own shards and offsets) goes in a file of its own beside DeepSpeed's."""
        tag = f"step_{state.step:08d}"
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={"train_state": asdict(state)}, save_latest=False)
        position_path = self.data_position_path(self.directory / tag)
        position_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(position_path, json.dumps(data_position, indent=1))
        _barrier()
        if self.rank == 0:
            write_text_atomically(self.directory / LATEST, tag)
        _barrier()
        return self.directory / tag

    def resolve(self, resume: str) -> Path:
        """`latest` → the newest complete checkpoint; anything else is a checkpoint directory."""
        if resume == LATEST:
            pointer = self.directory / LATEST
            if not pointer.exists():
                raise FileNotFoundError(f"train.resume=latest: no checkpoint in {self.directory} (missing {pointer})")
            return self.directory / pointer.read_text().strip()
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume: {resume} is not a checkpoint directory")
        return path

    def data_position_path(self, checkpoint: Path) -> Path:
        return checkpoint / "data" / f"rank{self.rank:05d}.json"

    def load(self, engine, resume: Optional[str]) -> Optional[tuple[TrainState, dict]]:
        """(loop state, this rank's data position), or None when not resuming."""
        if not resume:
            return None
        path = self.resolve(resume)
        position_path = self.data_position_path(path)
        if not position_path.exists():
            raise FileNotFoundError(f"train.resume: {path} has no data position for rank {self.rank} ({position_path}); was it written with another world size?")
        loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"train.resume: DeepSpeed could not load {path}")
        state = TrainState(**client_state["train_state"])
        log.info("resumed from %s at step %d", path, state.step)
        return state, json.loads(position_path.read_text())
