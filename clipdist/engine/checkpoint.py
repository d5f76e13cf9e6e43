"""DeepSpeed checkpoints plus the loop's own state, RNG and data position, written atomically.

Every rank writes into ``<tag>.partial/``; once all have finished, rank 0 renames it to ``<tag>``
and then replaces the ``latest`` pointer (each a rename, atomic on POSIX file systems). A kill at
any moment of a save therefore leaves ``latest`` naming the previous, complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from clipdist.config import ConfigError
from clipdist.fileio import fsync_directory, replaced_atomically, write_text_atomically

log = logging.getLogger(__name__)

LATEST = "latest"
AUTO = "auto"
PARTIAL = ".partial"
MODEL = "model.json"  # the model_fingerprint a checkpoint was written with
UNIVERSAL = "universal"  # a checkpoint's universal form, made on an elastic resume


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss, over the whole run


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, rank: int, keep: int = 0, model: Optional[dict] = None):
        self.directory = Path(directory)
        self.rank = rank
        self.keep = keep  # train.keep_checkpoints
        # config.model_fingerprint of the run: written into each checkpoint, and what a checkpoint
        # to continue must have been written with.
        self.model = model

    def save(self, engine, state: TrainState, data_position: dict) -> Path:
        """Collective: every rank must call it at the same step. Each rank's data position (its
        own shards and offsets) and RNG state go in files of their own beside DeepSpeed's."""
        tag = self._new_tag(state.step)
        partial = self.directory / (tag + PARTIAL)
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a save that was killed
        _barrier()
        engine.save_checkpoint(str(self.directory), tag=partial.name, client_state={"train_state": asdict(state)}, save_latest=False)
        write_text_atomically(self._new_rank_file(partial, "data", "json"), json.dumps(data_position, indent=1))
        if self.rank == 0 and self.model is not None:
            write_text_atomically(partial / MODEL, json.dumps(self.model, indent=1))
        with replaced_atomically(self._new_rank_file(partial, "rng", "pt")) as tmp:
            torch.save(rng_state(), tmp)
        _barrier()
        if self.rank == 0:
            os.replace(partial, self.directory / tag)
            fsync_directory(self.directory)
            write_text_atomically(self.directory / LATEST, tag)
            prune_checkpoints(self.directory, self.keep)
        _barrier()
        return self.directory / tag

    def _new_tag(self, step: int) -> str:
        """step_N, or step_N.1 ... when a checkpoint of step N exists (a stop after skipped
        steps saves the same weights at a later data position)."""
        tag, n = f"step_{step:08d}", 0
        while (self.directory / tag).exists():
            n += 1
            tag = f"step_{step:08d}.{n}"
        return tag

    def resolve(self, resume: Optional[str], zero_stage: Optional[int] = None) -> Optional[Path]:
        """`latest` → the newest complete checkpoint; `auto` → the same, or None (a fresh start)
        when there is none yet; None → None; anything else is a checkpoint directory.

        A ConfigError naming train.resume when that names no clipdist checkpoint or, given the
        run's ``zero_stage``, one whose optimizer state this run cannot take: AdamW's moments
        would be lost, silently. It only looks at files, so every rank finds the same before any
        collective: all stop together, in seconds, rather than one rank deep inside DeepSpeed."""
        path = self._named_checkpoint(resume)
        if path is None:
            return None
        first_position = Path("data", rank_file_name(0, "json"))  # every clipdist checkpoint has it
        if not (path / first_position).is_file():
            raise ConfigError(f"train.resume: {path} is not a clipdist checkpoint (it has no {first_position}){where_checkpoints_are(path)}")
        self._check_model(path)
        written = zero_partitions(path)
        if zero_stage is not None and written != stage_layout(zero_stage):
            raise ConfigError(
                f"train.resume: {path} was written with {LAYOUTS[written][0]}, this run has deepspeed.zero_stage={zero_stage}; "
                f"AdamW's moments do not carry over between the two: resume with deepspeed.zero_stage={LAYOUTS[written][1]}"
            )
        return path

    def _check_model(self, path: Path) -> None:
        """A ConfigError naming the model keys that differ from the checkpoint's (checkpoints
        written before model.json was saved are not checked)."""
        if self.model is None or not (path / MODEL).is_file():
            return
        saved = json.loads((path / MODEL).read_text())
        changed = [f"{key} {saved.get(key)} → {value}" for key, value in self.model.items() if saved.get(key) != value]
        if changed:
            raise ConfigError(
                f"train.resume: {path} holds another model ({', '.join(changed)}); a checkpoint continues only the model "
                "that wrote it: set those keys back, or start a new run (train.resume=null)"
            )

    def _named_checkpoint(self, resume: Optional[str]) -> Optional[Path]:
        if not resume:
            return None
        if resume in (LATEST, AUTO):
            pointer = self.directory / LATEST
            if not pointer.exists():
                if resume == AUTO:
                    return None
                raise ConfigError(f"train.resume=latest: no checkpoint in {self.directory} (missing {pointer})")
            path = self.directory / pointer.read_text().strip()
            if not path.is_dir():
                raise ConfigError(f"train.resume={resume}: {pointer} names {path.name}, which does not exist")
            return path
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"train.resume: no such checkpoint directory: {resume}")
        if not path.is_dir():
            raise ConfigError(f"train.resume: {resume} is a file; a checkpoint is a directory (step_N under <train.output_dir>/checkpoints)")
        return path

    def _per_rank_path(self, checkpoint: Path, kind: str, suffix: str) -> Path:
        return checkpoint / kind / rank_file_name(self.rank, suffix)

    def _new_rank_file(self, checkpoint: Path, kind: str, suffix: str) -> Path:
        path = self._per_rank_path(checkpoint, kind, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def data_position_path(self, checkpoint: Path) -> Path:
        return self._per_rank_path(checkpoint, "data", "json")

    def load(self, engine, path: Optional[Path], universal: bool = False) -> Optional[tuple[TrainState, dict]]:
        """(loop state, this rank's data position) of the checkpoint at ``path`` (from
        ``resolve``), with this rank's RNG restored; None when not resuming. ``universal``
        (from ``needs_universal_load``; the engine was built to load one): ZeRO partitions of
        another layout, converted first."""
        if path is None:
            return None
        position_files = sorted((path / "data").glob("rank*.json"))
        load_dir, tag = (universal_checkpoint(path, self.rank), UNIVERSAL) if universal else (path.parent, path.name)
        loaded, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if loaded is None:
            raise RuntimeError(f"train.resume: DeepSpeed could not load {path}")
        state = TrainState(**client_state["train_state"])
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if len(position_files) == world_size:  # each rank reads its own files only
            rng_path = self._per_rank_path(path, "rng", "pt")
            if rng_path.exists():  # checkpoints before RNG was saved have none
                restore_rng_state(torch.load(rng_path, weights_only=False))
            log.info("resumed from %s at step %d", path, state.step)
            return state, json.loads(self.data_position_path(path).read_text())
        # Another world size (elastic resume): one position for all, the counts of every old rank
        # on rank 0 alone (metrics sum them over the ranks), and RNG streams derived from the
        # run's seed and step.
        position = json.loads(position_files[0].read_text())
        torch.manual_seed(position["seed"] * 1_000_003 + state.step * 1_009 + self.rank)
        log.info("resumed from %s at step %d, written by %d rank(s), on %d", path, state.step, len(position_files), world_size)
        stats = summed_stats([json.loads(f.read_text()) for f in position_files]) if self.rank == 0 else {"skipped": {}, "rows": {}}
        return state, {**position, "stats": stats}


def saved_world_size(checkpoint: Path) -> int:
    return len(list((checkpoint / "data").glob("rank*.json")))


def zero_partitions(checkpoint: Path) -> Optional[str]:
    """How the checkpoint's optimizer state is laid out: "zero3" (parameters partitioned too),
    "zero" (ZeRO-1/2: optimizer state and gradients), or None (ZeRO-0: one file)."""
    if any(checkpoint.glob("*zero_pp_rank_*_model_states.pt")):
        return "zero3"
    return "zero" if any(checkpoint.glob("*optim_states.pt")) else None


# A checkpoint's optimizer layout: how the files say it, and the stages that can load it.
LAYOUTS = {
    None: ("ZeRO-0 (the whole optimizer state in one file)", "0"),
    "zero": ("ZeRO-1/2 (the optimizer state partitioned per rank)", "1 or 2"),
    # DeepSpeed's universal checkpoints of ZeRO-3 and of ZeRO-1/2 differ too (zero/optimizer_state.pt).
    "zero3": ("ZeRO-3 (parameters and optimizer state partitioned per rank)", "3"),
}


def stage_layout(zero_stage: int) -> Optional[str]:
    return None if zero_stage == 0 else "zero3" if zero_stage == 3 else "zero"


def needs_universal_load(checkpoint: Optional[Path], world_size: int) -> bool:
    """Whether DeepSpeed must load ``checkpoint`` as a universal checkpoint: its ZeRO partitions
    are of another world size. Known from the files alone, before the engine is built, which
    must be told."""
    return checkpoint is not None and zero_partitions(checkpoint) is not None and saved_world_size(checkpoint) != world_size


def universal_checkpoint(checkpoint: Path, rank: int) -> Path:
    """``checkpoint/universal``: DeepSpeed's universal form of the checkpoint (each parameter's
    fp32 weights and AdamW moments whole, in files of their own), which any world size can load.
    Rank 0 converts it once (ds_to_universal, in a child process) and renames it into place;
    every rank waits for it. A failed conversion is a ConfigError on every rank, in the same
    words. Returns the folder holding it."""
    target = checkpoint / UNIVERSAL
    failure = None
    if rank == 0 and not target.is_dir():
        started = time.monotonic()
        try:
            convert_to_universal(checkpoint, target)
        except ConversionFailed as error:
            failure = str(error)
        except OSError as error:  # e.g. a read-only checkpoint folder
            failure = f"train.resume: cannot write the universal form of {checkpoint} beside it: {error}"
        else:
            log.info(
                "converted %s (ZeRO partitions of %d rank(s)) to a universal checkpoint in %.1f s",
                checkpoint, saved_world_size(checkpoint), time.monotonic() - started,
            )  # fmt: skip
    failure = _from_rank_0(failure)
    if failure:
        raise ConfigError(failure)
    return checkpoint


class ConversionFailed(Exception):
    pass


def _from_rank_0(value):
    """Rank 0's ``value`` on every rank (a collective; as is where there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def convert_to_universal(checkpoint: Path, target: Path) -> None:
    """DeepSpeed's converter, writing into a scratch folder that is renamed when complete (a
    kill midway leaves no half universal checkpoint behind). ConversionFailed, in one line that
    points at the converter's output, when it fails."""
    scratch = checkpoint / (UNIVERSAL + PARTIAL)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    # Inside the scratch folder: the converter also writes a `latest_universal` beside its output.
    output, output_log = scratch / UNIVERSAL, scratch / "ds_to_universal.log"
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
               "--output_folder", str(output), "--inject_missing_state"]  # fmt: skip
    with open(output_log, "w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        lines = [line for line in output_log.read_text(errors="replace").splitlines() if line.strip()]
        raise ConversionFailed(
            f"train.resume: converting {checkpoint} (ZeRO partitions of {saved_world_size(checkpoint)} rank(s)) to a universal checkpoint "
            f"for this world size failed: {lines[-1].strip() if lines else f'exit status {done.returncode}'} (all of its output: {output_log})"
        )
    os.replace(output, target)
    shutil.rmtree(scratch)
    fsync_directory(checkpoint)


def summed_stats(positions: list) -> dict:
    """The data counters of every rank's position, added up."""
    skipped, rows = Counter(), Counter()
    for position in positions:
        skipped.update(position["stats"]["skipped"])
        rows.update(position["stats"]["rows"])
    return {"skipped": dict(skipped), "rows": dict(rows)}


def rank_file_name(rank: int, suffix: str) -> str:
    """A rank's file in a checkpoint's data/ and rng/ folders."""
    return f"rank{rank:05d}.{suffix}"


def where_checkpoints_are(path: Path) -> str:
    """A hint when ``path`` is a run's folder or its checkpoints folder: the checkpoint to name."""
    for directory in (path, path / "checkpoints"):
        if (directory / LATEST).is_file():
            return f"; its newest checkpoint is {directory / (directory / LATEST).read_text().strip()} (or train.resume=latest with train.output_dir={directory.parent})"
    return ""


def prune_checkpoints(directory: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (0: keep all); never the one
    `latest` names. Returns the names deleted. Runs after `latest` moved on, so a kill midway
    leaves only extra old checkpoints behind."""
    if keep <= 0:
        return []
    latest = (directory / LATEST).read_text().strip()
    complete = sorted((p for p in directory.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)), key=checkpoint_order)
    doomed = [p for p in complete[: max(0, len(complete) - keep)] if p.name != latest]
    for path in doomed:
        shutil.rmtree(path)
    return [p.name for p in doomed]


def checkpoint_order(path: Path) -> tuple[int, int]:
    """step_00000005 < step_00000005.1 < step_00000006."""
    step, _, n = path.name.removeprefix("step_").partition(".")
    return int(step), int(n or 0)


def rng_state() -> dict:
    """Every generator a step may draw from (FLIP's patch dropout draws from torch's)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

