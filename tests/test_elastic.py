"""Elastic resume: a run continues on another number of ranks at the same global batch
(train.accum_steps=auto), mid-epoch, training exactly the global batches the uninterrupted run
would have trained. Data-level checks of other layouts (4 → 3, 2, 1 ranks; other loader
workers) are in tests/test_data_pipeline.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import QUIET_EVAL, keys_by_step, losses, run_distributed, torchrun, train_overrides

pytestmark = pytest.mark.slow

# Tiny ViT (no BatchNorm, so the loss of a global batch does not depend on how it is split), 4
# samples per micro-batch, global batch 48: 4 ranks × 3, 2 ranks × 6 or 3 ranks × 4 micro-batches.
ELASTIC = ["data.local_batch=4", "train.global_batch=48", "train.accum_steps=auto", "train.max_steps=8", "data.record_keys=true", *QUIET_EVAL]


def global_batches(run_dir: Path, accum_steps: int) -> dict[tuple[int, int], set[str]]:
    """(epoch, step) -> the keys trained at that step over all ranks, from data.record_keys."""
    return keys_by_step((keys_file.read_text().splitlines() for keys_file in (run_dir / "keys").glob("rank*.txt")), accum_steps)


def continued(run_dir: Path, checkpoint: Path) -> Path:
    """A new run directory holding ``checkpoint`` as its latest, and the launches so far
    (run_info.json), as a requeued job finds its own."""
    shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    (run_dir / "checkpoints" / "latest").write_text(checkpoint.name)
    shutil.copy2(checkpoint.parent.parent / "run_info.json", run_dir / "run_info.json")
    return run_dir


def test_a_run_continues_on_half_then_twice_then_three_quarters_of_the_ranks_with_the_uninterrupted_losses(tmp_path, digits):
    """4 ranks to step 4 (a checkpoint); 2 ranks from it to step 6 (a checkpoint, mid-way through
    the epoch planned for 4 ranks) and on; 4 ranks again from step 6 to step 7 (a checkpoint); 3
    ranks from step 7. Every step after a change of world size trains the uninterrupted 4-rank
    run's global batch, key for key, and its loss equals the uninterrupted loss within 1e-5
    (ZeRO-0, fp32)."""
    four = tmp_path / "four"
    full = losses(torchrun(four, digits, *ELASTIC, "train.checkpoint_every=4", nproc=4))
    two = continued(tmp_path / "two", four / "checkpoints" / "step_00000004")
    halved = losses(torchrun(two, digits, *ELASTIC, "train.checkpoint_every=2", "train.resume=latest", nproc=2))
    four_again = continued(tmp_path / "four-again", two / "checkpoints" / "step_00000006")
    doubled = losses(torchrun(four_again, digits, *ELASTIC, "train.checkpoint_every=1", "train.resume=latest", nproc=4))
    three = continued(tmp_path / "three", four_again / "checkpoints" / "step_00000007")
    three_quarters = losses(torchrun(three, digits, *ELASTIC, "train.resume=latest", nproc=3))

    assert (sorted(halved), sorted(doubled), sorted(three_quarters)) == ([5, 6, 7, 8], [7, 8], [8])
    for resumed in (halved, doubled, three_quarters):
        assert all(abs(resumed[step] - full[step]) <= 1e-5 for step in resumed), {s: (full[s], resumed[s]) for s in resumed}
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in (two, four_again, three)]
    assert [(s["launch_world_sizes"], s["global_batch"]) for s in summaries] == [([4, 2], 48), ([4, 2, 4], 48), ([4, 2, 4, 3], 48)]
    planned = global_batches(four, accum_steps=3)
    assert all(len(planned[0, step]) == 48 for step in range(8))
    for run_dir, accum_steps, steps in ((two, 6, range(4, 8)), (four_again, 3, range(6, 8)), (three, 4, range(7, 8))):
        trained = global_batches(run_dir, accum_steps)
        assert {step: trained[0, step] for step in steps} == {step: planned[0, step] for step in steps}, run_dir.name


# --- every ZeRO stage: the checkpoint of 2 ranks continues on 3 -----------------------------

WRITTEN_STAGES = (0, 1, 2, 3)  # ZeRO-3 last in each process: it partitions the module in place
# (stage written on 2 ranks, stage resumed with on 3): each stage as it was, and ZeRO-1's as
# ZeRO-2 (gradients partitioned too). Between ZeRO-3 and the others, a refusal (test_train.py).
RESUMED = ((1, 1), (2, 2), (3, 3), (1, 2))
# Global batch 24: 2 ranks × 3 micro-batches of 4, or 3 ranks × 2.
ZERO_RUN = ["data.local_batch=4", "train.global_batch=24", "train.accum_steps=auto", "optim.warmup_steps=1"]
# Under ZeRO-3 every forward is a collective, so the final retrieval evaluation, whose image and
# caption forwards every rank must run alike, runs there; the other runs skip evaluation.
RETRIEVAL_ONLY = ["eval.zero_shot=[]"]


def _components(run_dir: Path, digits: Path, stage: int, max_steps: int, *overrides: str):
    from clipdist.config import load_config, validate
    from clipdist.distributed import DistEnv
    from clipdist.train import build_components

    args = train_overrides(run_dir, digits, *ZERO_RUN, f"deepspeed.zero_stage={stage}", f"train.max_steps={max_steps}", *overrides)
    cfg, resolved = load_config(args)
    env = DistEnv.from_environ({**os.environ, "LOCAL_WORLD_SIZE": os.environ["WORLD_SIZE"]})  # run_distributed: one node
    validate(cfg, env.world_size)  # as clipdist.train's start: train.accum_steps=auto settles
    return cfg, env, build_components(cfg, env, resolved)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def optimizer_digest(engine) -> dict:
    """Everything a resume must restore, gathered whole whatever the ZeRO stage (a collective),
    as SHA-256 digests per parameter (bit-for-bit equality) and plain numbers."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    def digest(tensor) -> str:
        return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()

    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19's ZeRO-1/2 links each parameter to its AdamW moments once, right after
        # the first param group's first step (stage_1_and_2._optimizer_step): the moments of our
        # second group (no weight decay) stay unlinked and unreadable. Link them all again.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        weights = {name: digest(p) for name, p in named}
    tensors = {
        name: {
            "weights": weights[name],
            "fp32": digest(safe_get_full_fp32_param(p)),
            "exp_avg": digest(safe_get_full_optimizer_state(p, "exp_avg")),
            "exp_avg_sq": digest(safe_get_full_optimizer_state(p, "exp_avg_sq")),
        }
        for name, p in named
    }
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    adam_steps = sorted({float(s["step"]) for s in inner.state.values()})
    schedule = {"global_steps": engine.global_steps, "lr": engine.get_lr(), "scheduler_epoch": engine.lr_scheduler.last_epoch, "adam_steps": adam_steps}
    return {"tensors": tensors, "schedule": schedule}


def _write_zero_checkpoints(rank: int, world_size: int, digits: Path, root: Path) -> dict:
    """Each stage: 2 steps (a checkpoint at the end) and its state then; then, from that
    checkpoint on the same ranks (DeepSpeed's own load), step 3."""
    from clipdist.engine import TrainState
    from clipdist.train import release, resume, train_loop

    digests = {}
    for stage in WRITTEN_STAGES:
        cfg, env, run = _components(root / f"zero{stage}", digits, stage, 2, *(RETRIEVAL_ONLY if stage == 3 else QUIET_EVAL))
        train_loop(cfg, env, run, TrainState())
        digests[stage] = optimizer_digest(run.engine) if stage else None  # ZeRO-0 is resumed by the tests above
        release(run)
        cfg, env, run = _components(root / f"zero{stage}", digits, stage, 3, "train.resume=latest", *QUIET_EVAL)
        train_loop(cfg, env, run, resume(run))
        release(run)
    return digests if rank == 0 else None


def _resume_zero_checkpoints(rank: int, world_size: int, digits: Path, root: Path) -> dict:
    """Each (written, resumed) stage pair: the state right after loading the 2-rank checkpoint
    (converted to a universal one on the way), then step 3."""
    from clipdist.train import release, resume, train_loop

    digests = {}
    for written, stage in RESUMED:
        checkpoint = root / f"zero{written}" / "checkpoints" / "step_00000002"
        cfg, env, run = _components(root / f"zero{written}-on-{world_size}-zero{stage}", digits, stage, 3, f"train.resume={checkpoint}", *QUIET_EVAL)
        state = resume(run)
        digests[written, stage] = {**optimizer_digest(run.engine), "step": state.step, "universal": run.universal_load}
        train_loop(cfg, env, run, state)
        release(run)
    return digests if rank == 0 else None


def test_every_zero_stage_continues_on_another_world_size_with_its_weights_and_moments(tmp_path, digits):
    """The ZeRO-0/1/2/3 checkpoints of 2 ranks (step 2 of the same run: their losses agree within
    1e-5, as ZeRO must not change training) load on 3 ranks, ZeRO-1's also as ZeRO-2. ZeRO-1/2/3
    partitions go through DeepSpeed's universal checkpoint, made on resume: every parameter's
    weights, fp32 master copy and both AdamW moments are equal bit for bit (SHA-256 of the whole
    tensor, gathered) to those of the run that wrote the checkpoint; the step counters and the
    learning rate are the same; and step 3 on 3 ranks has the 2-rank run's loss within 1e-5."""
    written = run_distributed(_write_zero_checkpoints, world_size=2, args=(digits, tmp_path), timeout=300)[0]
    resumed = run_distributed(_resume_zero_checkpoints, world_size=3, args=(digits, tmp_path), timeout=300)[0]

    runs = {stage: losses(read_metrics(tmp_path / f"zero{stage}")) for stage in WRITTEN_STAGES}
    recalls = [value for row in read_metrics(tmp_path / "zero3") for key, value in row.items() if key.endswith("image_to_text_R@1")]
    assert len(recalls) == 1 and 0 <= recalls[0] <= 1, recalls  # ZeRO-3's retrieval evaluation ran, once
    for stage in WRITTEN_STAGES:
        assert sorted(runs[stage]) == [1, 2, 3], runs[stage]
        assert all(abs(runs[stage][step] - runs[0][step]) <= 1e-5 for step in (1, 2, 3)), (stage, runs[stage], runs[0])
    for (stage, resumed_stage), after_load in resumed.items():
        before = written[stage]
        assert after_load["universal"] and after_load["step"] == 2, (stage, resumed_stage, after_load["universal"], after_load["step"])
        assert after_load["schedule"] == before["schedule"], (stage, resumed_stage, after_load["schedule"], before["schedule"])
        differing = {name: [kind for kind in digests if digests[kind] != before["tensors"][name][kind]] for name, digests in after_load["tensors"].items()}
        assert after_load["tensors"].keys() == before["tensors"].keys() and not any(differing.values()), (stage, resumed_stage, differing)
        step3 = losses(read_metrics(tmp_path / f"zero{stage}-on-3-zero{resumed_stage}"))
        assert sorted(step3) == [3] and abs(step3[3] - runs[stage][3]) <= 1e-5, (stage, resumed_stage, step3, runs[stage][3])
    assert sorted(p.name for p in (tmp_path / "zero1" / "checkpoints" / "step_00000002").iterdir()) == sorted(
        ["data", "rng", "universal", "model.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    ), "one universal form beside the checkpoint, shared by both resumes of it"


def _convert(rank: int, world_size: int, checkpoint: Path) -> str:
    from clipdist.config import ConfigError
    from clipdist.engine.checkpoint import universal_checkpoint

    try:
        universal_checkpoint(checkpoint, rank)
    except ConfigError as error:
        return str(error)
    return "no error"


def test_a_checkpoint_that_cannot_be_converted_stops_every_rank_with_the_same_line(tmp_path):
    """Rank 0 converts; when DeepSpeed's converter fails (here: a damaged optimizer partition),
    every rank raises the same one-line ConfigError (clipdist.train prints it, exit 2) naming the
    checkpoint and the converter's last line, and the partial output is kept for inspection."""
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "data").mkdir(parents=True)
    for rank in (0, 1):
        (checkpoint / "data" / f"rank{rank:05d}.json").write_text("{}")
        (checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"not a torch file")
    (checkpoint / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    lines = run_distributed(_convert, world_size=3, args=(checkpoint,), timeout=120)
    output = checkpoint / "universal.partial" / "ds_to_universal.log"
    assert len(set(lines)) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith(f"train.resume: converting {checkpoint} (ZeRO partitions of 2 rank(s)) to a universal checkpoint for this world size failed: ")
    assert lines[0].endswith(f"(all of its output: {output})") and output.is_file(), lines[0]
    assert not (checkpoint / "universal").exists()
