"""DeepSpeed checkpoints plus the loop's own state, with an atomically written `latest` pointer.

A checkpoint directory is complete once `latest` names it: the pointer is only replaced (by
rename) after every rank has finished writing, so a crash mid-save leaves the previous one loadable.
"""

from __future__ import annotations

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

    def save(self, engine, state: TrainState) -> Path:
        """Collective: every rank must call it at the same step."""
        tag = f"step_{state.step:08d}"
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={"train_state": asdict(state)}, save_latest=False)
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

    def load(self, engine, resume: Optional[str]) -> Optional[TrainState]:
        if not resume:
            return None
        path = self.resolve(resume)
        loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"train.resume: DeepSpeed could not load {path}")
        state = TrainState(**client_state["train_state"])
        log.info("resumed from %s at step %d", path, state.step)
        return state
