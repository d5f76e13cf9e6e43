"""Elastic resume: a run continues on another number of ranks at the same global batch
(train.accum_steps=auto), mid-epoch, training exactly the global batches the uninterrupted run
would have trained. Data-level checks of other layouts (4 → 3, 2, 1 ranks; other loader
workers) are in tests/test_data_pipeline.py."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import QUIET_EVAL, losses, torchrun

pytestmark = pytest.mark.slow

# Tiny ViT (no BatchNorm, so the loss of a global batch does not depend on how it is split), 8
# samples per micro-batch, global batch 32: 4 ranks × 1 or 2 ranks × 2 micro-batches.
ELASTIC = ["data.local_batch=8", "train.global_batch=32", "train.accum_steps=auto", "train.max_steps=8", "data.record_keys=true", *QUIET_EVAL]


def global_batches(run_dir: Path, accum_steps: int) -> dict[tuple[int, int], set[str]]:
    """(epoch, step) -> the keys trained at that step over all ranks, from data.record_keys."""
    batches: dict[tuple[int, int], set[str]] = defaultdict(set)
    for keys_file in (run_dir / "keys").glob("rank*.txt"):
        for line in keys_file.read_text().splitlines():
            epoch, micro_batch, *keys = line.split()
            batches[int(epoch), int(micro_batch) // accum_steps].update(keys)
    return batches


def continued(run_dir: Path, checkpoint: Path) -> Path:
    """A new run directory holding ``checkpoint`` as its latest, and the launches so far
    (run_info.json), as a requeued job finds its own."""
    shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    (run_dir / "checkpoints" / "latest").write_text(checkpoint.name)
    shutil.copy2(checkpoint.parent.parent / "run_info.json", run_dir / "run_info.json")
    return run_dir


def test_a_run_continues_on_half_then_twice_the_ranks_with_the_uninterrupted_losses(tmp_path, digits):
    """4 ranks to step 4 (a checkpoint); 2 ranks from it, accumulating 2 micro-batches, to step 6
    (a checkpoint, mid-way through the epoch planned for 4 ranks) and on; 4 ranks again from step
    6. Every step after a change of world size trains the uninterrupted 4-rank run's global batch,
    key for key, and its loss equals the uninterrupted loss within 1e-5 (ZeRO-0, fp32)."""
    four = tmp_path / "four"
    full = losses(torchrun(four, digits, *ELASTIC, "train.checkpoint_every=4", nproc=4))
    two = continued(tmp_path / "two", four / "checkpoints" / "step_00000004")
    halved = losses(torchrun(two, digits, *ELASTIC, "train.checkpoint_every=2", "train.resume=latest", nproc=2))
    four_again = continued(tmp_path / "four-again", two / "checkpoints" / "step_00000006")
    doubled = losses(torchrun(four_again, digits, *ELASTIC, "train.resume=latest", nproc=4))

    assert (sorted(halved), sorted(doubled)) == ([5, 6, 7, 8], [7, 8])
    for resumed in (halved, doubled):
        assert all(abs(resumed[step] - full[step]) <= 1e-5 for step in resumed), {s: (full[s], resumed[s]) for s in resumed}
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in (two, four_again)]
    assert [(s["launch_world_sizes"], s["global_batch"]) for s in summaries] == [([4, 2], 32), ([4, 2, 4], 32)]
    planned = global_batches(four, accum_steps=1)
    assert all(len(planned[0, step]) == 32 for step in range(8))
    for run_dir, accum_steps, steps in ((two, 2, range(4, 8)), (four_again, 1, range(6, 8))):
        trained = global_batches(run_dir, accum_steps)
        assert {step: trained[0, step] for step in steps} == {step: planned[0, step] for step in steps}, run_dir.name
