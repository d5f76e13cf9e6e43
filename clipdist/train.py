"""Train CLIP over the global batch.

    torchrun --nproc_per_node 2 -m clipdist.train +experiment=digits [key=value ...]

Each rank embeds its local batch with both towers; the loss all-gathers the embeddings so the
negatives span the global batch (CLIP paper, Figure 3):

    I_e, T_e, scale = model(images, texts)            # normalised [b, d] each
    loss = symmetric_cross_entropy(scale · I_e @ T_allᵀ, scale · T_e @ I_allᵀ)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from clipdist.cli import refuse, start
from clipdist.config import Config, ConfigError, global_batch, model_fingerprint
from clipdist.data import DataError, TrainData, describe_counts, ensure_data
from clipdist.distributed import DistEnv, all_reduce_sum, barrier, destroy_distributed, get_rank, init_distributed
from clipdist.engine import (
    Checkpointer,
    TrainState,
    accumulation_groups,
    build_engine,
    effective_precision,
    input_dtype,
    needs_universal_load,
    train_step,
)
from clipdist.eval import EvalShape, run_evals, summary_fields
from clipdist.faults import (
    PEER_FAULT_EXIT,
    NonFiniteLoss,
    PeerFault,
    StopSignals,
    TrainingStopped,
    Watchdog,
    is_loader_worker_death,
    is_peer_failure,
    requeue_slurm_job,
)
from clipdist.fileio import write_text_atomically
from clipdist.log import MetricLogger
from clipdist.losses import build_loss
from clipdist.models import build_model, load_pretrained
from clipdist.perf import ThroughputMeter, build_throughput_meter
from clipdist.plan import describe_run_plan
from clipdist.sweep import sweep_point

log = logging.getLogger("clipdist")


@dataclass
class Components:
    engine: Any  # deepspeed.DeepSpeedEngine
    loss_fn: torch.nn.Module
    data: TrainData
    checkpointer: Checkpointer
    resume_from: Optional[Path]  # the checkpoint this launch continues, if any
    universal_load: bool  # its ZeRO partitions are of another world size: converted to a universal checkpoint on load
    logger: MetricLogger
    device: torch.device
    stop: StopSignals
    watchdog: Watchdog
    rss_at_start: int  # bytes resident before the data, model and engine (what clipdist.plan's budget adds to)


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = start(argv, multirun_task=sweep_point)
    if isinstance(started, int):
        return started
    env, cfg, resolved = started
    try:
        train(cfg, env, resolved)
    except PeerFault:  # its line, logged, names the peer at fault; a traceback would only show this rank's wait
        return PEER_FAULT_EXIT
    except TrainingStopped as stopped:
        log.error("clipdist: %s", stopped)
        return 1
    except ConfigError as error:  # found before the engine: train.resume names no checkpoint this run can use
        return refuse("config error", error)
    except DataError as error:  # found before the first step: the data cannot be used as configured
        return refuse("data error", error)
    return 0


def train(cfg: Config, env: DistEnv, resolved: Dict[str, Any]) -> Dict[str, Any]:
    """Train to train.max_steps, or until a stop signal (then checkpoint and requeue)."""
    cfg.deepspeed = effective_precision(cfg.deepspeed)
    init_distributed(env, socket_ifname=cfg.launch.socket_ifname)
    stop = StopSignals()
    watchdog = Watchdog.for_env(cfg.train.fault_timeout_s, env)
    watchdog.watch(stop)
    watchdog.start()
    try:
        with stop:
            run = build_components(cfg, env, resolved, stop, watchdog)
            try:
                summary = train_loop(cfg, env, run, resume(run))
            except TrainingStopped:
                release(run)  # every rank stopped together: a clean collective teardown
                raise
            release(run)
            if summary.get("preempted") and cfg.train.requeue and env.rank == 0:
                # Still under our handlers: the requeue SIGTERMs this job's processes at once.
                log.info("%s", requeue_slurm_job() or "not under Slurm: restart with train.resume=auto to continue")
        return summary
    except Exception as error:
        # A peer that died breaks this rank's collectives at once; say which one it was. Under
        # torchrun the agent also SIGTERMs this rank's process group, killing its DataLoader
        # workers, whose death may be the error raised (or raised while handling the collective's).
        if env.world_size > 1 and (is_peer_failure(error) or (stop.received and is_loader_worker_death(error))):
            raise PeerFault(watchdog.explain(error, stop)) from error
        raise
    finally:
        watchdog.stop()
        destroy_distributed()
        forget_deepspeed_world_group()


def forget_deepspeed_world_group() -> None:
    """DeepSpeed caches its clone of the world group across engines; after the process group is
    destroyed, a second train() in this process (a Hydra sweep's next point) needs a fresh one."""
    import deepspeed.utils.groups

    deepspeed.utils.groups._WORLD_GROUP = None


def release(run: Components) -> None:
    run.logger.close()
    # Release ZeRO-3's hooks and parameter fetches, then meet the other ranks, before the
    # process group goes: gloo torn down under a pending asynchronous op aborts the process.
    run.engine.destroy()
    barrier()


def build_components(
    cfg: Config, env: DistEnv, resolved: Dict[str, Any], stop: Optional[StopSignals] = None, watchdog: Optional[Watchdog] = None
) -> Components:
    """Everything a run needs. Without ``stop`` and ``watchdog`` (a library caller), no signal
    stops it and no watchdog runs."""
    rss_at_start = resident_bytes()
    run_dir = Path(cfg.train.output_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", env.rank, keep=cfg.train.keep_checkpoints, model=model_fingerprint(cfg.model))
    resume_from = checkpointer.resolve(cfg.train.resume, zero_stage=cfg.deepspeed.zero_stage)  # first: a wrong one costs seconds
    universal = needs_universal_load(resume_from, env.world_size)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    prepare_shards(cfg, env)
    # Before the engine: a data source that cannot be used stops the run in seconds, not minutes.
    data = TrainData(
        cfg.data,
        image_size=cfg.model.vision.image_size,
        context_length=cfg.model.text.context_length,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
        accum_steps=cfg.train.accum_steps,
        keys_file=run_dir / "keys" / f"rank{env.rank:05d}.txt" if cfg.data.record_keys else None,
        counts_file=run_dir / "shard_counts.json",
        resume_inexact=cfg.train.resume_inexact,
    )
    model = build_model(cfg.model)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained, cfg.model.pretrained_arch)  # before DeepSpeed: every rank loads the full weights
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    engine = build_engine(
        model,
        cfg.optim,
        cfg.deepspeed,
        local_batch=cfg.data.local_batch,
        accum_steps=cfg.train.accum_steps,
        world_size=env.world_size,
        total_steps=cfg.train.max_steps,
        load_universal=universal,
    )
    log.info(
        "%s: %.1fM parameters, global batch %d = %d local × %d ranks × %d accumulation (recipe: %d nodes × %d GPUs)",
        cfg.model.name,
        num_params / 1e6,
        global_batch(cfg, env.world_size),
        cfg.data.local_batch,
        env.world_size,
        cfg.train.accum_steps,
        cfg.launch.nodes,
        cfg.launch.gpus_per_node,
    )
    if cfg.launch.gpu_memory_gb is not None:
        log.info("%s", describe_run_plan(cfg, env.world_size))
    return Components(
        engine=engine,
        loss_fn=build_loss(cfg.loss),
        data=data,
        checkpointer=checkpointer,
        resume_from=resume_from,
        universal_load=universal,
        logger=MetricLogger(
            cfg.logging,
            run_dir,
            resolved,
            env.rank,
            resuming=resume_from is not None,
            world_size=env.world_size,
            resumed_from=None if resume_from is None else str(resume_from),
        ),
        device=device,
        stop=stop or StopSignals(),
        watchdog=watchdog or Watchdog.for_env(cfg.train.fault_timeout_s, env),
        rss_at_start=rss_at_start,
    )


def prepare_shards(cfg: Config, env: DistEnv) -> None:
    """Rank 0 writes the demo shards on first use; the others wait for them."""
    if env.rank == 0:
        ensure_data(cfg.data)
    barrier()


def resume(run: Components) -> TrainState:
    """The loop's state, RNG and data position of the checkpoint named by train.resume."""
    loaded = run.checkpointer.load(run.engine, run.resume_from, universal=run.universal_load)
    if loaded is None:
        return TrainState()
    state, data_position = loaded
    run.data.load_state_dict(data_position)
    return state


def train_batches(data: TrainData) -> Iterator[Tuple[int, int, Any]]:
    """(epoch, index in epoch, batch), epoch after epoch, from the data's position on."""
    for batch in data:
        yield data.epoch, data.next_batch - 1, batch


def train_loop(cfg: Config, env: DistEnv, run: Components, state: TrainState) -> Dict[str, Any]:
    engine, device = run.engine, run.device
    dtype = input_dtype(cfg.deepspeed)
    batch_size = global_batch(cfg, env.world_size)
    meter = build_throughput_meter(cfg, env.world_size, device)
    metrics: Dict[str, float] = {}
    saved, bad_in_a_row = state, 0  # a resumed state is saved already
    if state.step >= cfg.train.max_steps:
        log.info("nothing to train: resumed at step %d of train.max_steps=%d", state.step, cfg.train.max_steps)
        return finish(cfg, env, run, state, metrics, meter)
    for epoch, index, micro_batches in accumulation_groups(train_batches(run.data), cfg.train.accum_steps):
        run.watchdog.progress(f"step {state.step + 1}")
        try:
            # One optimizer step over train.accum_steps micro-batches, whose loss spans all of
            # them; outputs: image_emb, text_emb, logit_scale[, logit_bias].
            step_name = f"step {state.step + 1}"
            loss, outputs = train_step(engine, run.loss_fn, micro_batches, device, dtype, progress=lambda what: run.watchdog.progress(f"{step_name}, {what}"))
        except NonFiniteLoss as bad:
            bad_in_a_row += 1
            state = skip_step(cfg, run, state, epoch, index, bad, bad_in_a_row)
        else:
            bad_in_a_row = 0
            state = TrainState(state.step + 1, epoch, index + 1, state.samples_seen + batch_size, state.nonfinite_steps)
            meter.add(loss.detach(), batch_size)
            last_step = state.step == cfg.train.max_steps
            with meter.paused():
                if due(state.step, cfg.logging.log_every) or last_step:
                    metrics = log_step(cfg, run, meter, state, epoch, logit_scale=outputs[2])
                if last_step:
                    break
                if due(state.step, cfg.eval.every_steps):
                    run.watchdog.progress(f"eval after step {state.step}")
                    run.logger.log(evaluate(cfg, env, engine, device), state.step, state.samples_seen)
                if due(state.step, cfg.train.checkpoint_every):
                    checkpoint(run, state)
                    saved = state
        signalled = run.stop.agreed(device)  # collective: every rank stops after the same step
        if signalled:
            return stop_on_signal(run, state, saved, signalled)
    checkpoint(run, state)
    return finish(cfg, env, run, state, metrics, meter)


def skip_step(cfg: Config, run: Components, state: TrainState, epoch: int, index: int, bad: NonFiniteLoss, in_a_row: int) -> TrainState:
    """Count a step skipped for a NaN/inf loss (no update was made; its batch is consumed, so a
    resumed run skips it too); too many in a row stop the run with a checkpoint."""
    state = dataclasses.replace(state, epoch=epoch, step_in_epoch=index + 1, nonfinite_steps=state.nonfinite_steps + 1)
    log.warning("step %d skipped: %s (%d in a row, %d in all)", state.step + 1, bad, in_a_row, state.nonfinite_steps)
    if in_a_row >= cfg.train.max_bad_steps:
        path = checkpoint(run, state)
        raise TrainingStopped(
            f"train.max_bad_steps={cfg.train.max_bad_steps}: {in_a_row} steps in a row had a NaN/inf loss "
            f"(the last {bad}); stopped after step {state.step}, its weights saved in {path}"
        )
    return state


def log_step(cfg: Config, run: Components, meter: ThroughputMeter, state: TrainState, epoch: int, logit_scale: torch.Tensor) -> Dict[str, float]:
    metrics = meter.flush(run.engine, logit_scale=logit_scale)
    metrics.update(run.data.global_metrics(all_reduce_sum), **{"data/epoch": epoch})
    metrics["train/nonfinite_steps"] = state.nonfinite_steps
    run.logger.log({**metrics, "train/samples_seen": state.samples_seen}, state.step)
    run.logger.progress(state.step, cfg.train.max_steps, metrics)
    return metrics


def stop_on_signal(run: Components, state: TrainState, saved: TrainState, signalled: int) -> Dict[str, Any]:
    """Checkpoint (unless this very state is saved) and end the loop; train() requeues."""
    if saved != state:
        checkpoint(run, state)
        saved = state
    reason = f"{run.stop.received} on this rank" if run.stop.received else "a stop signal on a peer"
    log.warning("stopping after step %d: %s (%d rank(s) signalled); checkpoint of step %d", state.step, reason, signalled, saved.step)
    return {"preempted": True, "stop_reason": reason, "train_state": asdict(state)}


def finish(cfg: Config, env: DistEnv, run: Components, state: TrainState, metrics: Dict[str, float], meter: ThroughputMeter) -> Dict[str, Any]:
    """Final evaluation, data counts and summary.json."""
    run.watchdog.progress("final eval")
    eval_metrics = evaluate(cfg, env, run.engine, run.device)
    run.logger.log(eval_metrics, state.step, state.samples_seen)
    data_metrics = run.data.global_metrics(all_reduce_sum)
    log.info("data: %s", describe_counts(data_metrics))
    summary = summarize(cfg, env, state, metrics, eval_metrics, meter)
    summary["data"] = data_metrics
    summary["peak_memory"] = peak_memory_per_rank(run.device, env.world_size, run.rss_at_start)
    write_summary(summary, Path(cfg.train.output_dir), env.rank)
    run.logger.summary(summary)
    return summary


def peak_memory_per_rank(device: torch.device, world_size: int, rss_at_start: int) -> Dict[str, list]:
    """Each rank's peak resident set (the process's whole life), its resident set before the
    data, model and engine were built, and on a GPU its peak of allocated device memory: what
    clipdist.plan predicts, measured (a collective)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    allocated = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    everyone = torch.zeros(world_size, 3, dtype=torch.float64, device=device)
    everyone[get_rank()] = torch.tensor([rss, rss_at_start, allocated], dtype=torch.float64)
    columns = all_reduce_sum(everyone).T.tolist()
    return {name: [int(v) for v in column] for name, column in zip(("rss_bytes", "rss_at_start_bytes", "gpu_allocated_bytes"), columns)}


def resident_bytes() -> int:
    """This process's resident set (Linux; 0 where /proc is not there)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def checkpoint(run: Components, state: TrainState) -> Path:
    """Save, with the watchdog told before and after (a large save takes a while); returns the
    checkpoint's directory."""
    run.watchdog.progress(f"checkpoint of step {state.step}")
    path = run.checkpointer.save(run.engine, state, run.data.state_dict())
    run.watchdog.progress(f"checkpoint of step {state.step} written")
    return path


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def evaluate(cfg: Config, env: DistEnv, engine, device: torch.device) -> Dict[str, float]:
    """Every eval set (zero-shot, retrieval) with images sharded over all ranks (never rank 0 alone)."""
    # engine.module's dtype is the training dtype; the evaluations cast their inputs to it.
    shape = EvalShape(cfg.model.vision.image_size, cfg.model.text.context_length, env.rank, env.world_size, device)
    return run_evals(cfg.eval, engine.module, shape).metrics


def summarize(cfg, env, state, train_metrics, eval_metrics, meter: ThroughputMeter) -> Dict[str, Any]:
    return {
        "model": cfg.model.name,
        "world_size": env.world_size,
        # Every launch of the run, oldest first (an elastic resume changes it, not the global batch).
        "launch_world_sizes": launch_world_sizes(Path(cfg.train.output_dir)),
        "global_batch": global_batch(cfg, env.world_size),
        "steps": state.step,
        "samples_seen": state.samples_seen,
        "train_seconds": round(meter.train_seconds, 3),
        "samples_per_second": meter.train_samples / meter.train_seconds if meter.train_samples else None,
        "final_loss": train_metrics.get("train/loss"),
        **summary_fields(cfg.eval, eval_metrics),  # zero_shot_top1/top5/count: the first zero-shot set's
        "eval": eval_metrics,
        "train_state": asdict(state),
    }


def launch_world_sizes(run_dir: Path) -> list:
    """The world size of each launch that run_info.json records (this one last)."""
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
    except (OSError, ValueError):
        return []
    return [launch.get("world_size") for launch in [*info.get("previous_launches", []), info]]


def write_summary(summary: Dict[str, Any], run_dir: Path, rank: int) -> None:
    if rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("summary: %s", run_dir / "summary.json")


if __name__ == "__main__":
    sys.exit(main())
