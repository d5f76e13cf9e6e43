#!/bin/bash
# The body of the sbatch scripts in this folder: one srun task per GPU, each a clipdist rank that
# reads its rank, world size and rendezvous (first host of the node list, port from the job id)
# from Slurm's variables (clipdist/distributed.py). No torchrun in between, so Slurm's signals
# reach every rank: SIGUSR1 120 s before the time limit or at preemption, SIGTERM at the end.
# The ranks then agree to stop after the same step, checkpoint, and rank 0 runs
# `scontrol requeue`; the requeued job (same job id, same run directory) resumes from the newest
# complete checkpoint (train.resume=auto).
#
# Environment (all optional): EXPERIMENT (set by the sbatch script), CLIPDIST_ROOT (the repo;
# default: the submit directory), PYTHON ($CLIPDIST_ROOT/.venv/bin/python), CLIPDIST_TRAIN_URLS
# (shard pattern, read by conf/data/webdataset.yaml), WANDB_MODE (offline), RUN_NAME
# ($EXPERIMENT-<job id>), RUN_ROOT ($CLIPDIST_ROOT/runs). Arguments: Hydra overrides.
set -euo pipefail
: "${EXPERIMENT:?EXPERIMENT is not set: submit slurm/train_rn50.sh or slurm/train_vitl.sh, or set it}"
CLIPDIST_ROOT=${CLIPDIST_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-$CLIPDIST_ROOT/.venv/bin/python}
RUN_NAME=${RUN_NAME:-$EXPERIMENT-${SLURM_JOB_ID:-local}}
RUN_ROOT=${RUN_ROOT:-$CLIPDIST_ROOT/runs}
WANDB_MODE=${WANDB_MODE:-offline}
cd "$CLIPDIST_ROOT"

echo "$(date +%T) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
    "${SLURM_NTASKS:-?} ranks, run $RUN_ROOT/$RUN_NAME"
# --kill-on-bad-exit: a rank that fails ends its peers at once instead of leaving them in a
# collective (the watchdog, train.fault_timeout_s, covers the ranks that hang rather than exit).
srun --kill-on-bad-exit=1 "$PYTHON" -m clipdist.train "+experiment=$EXPERIMENT" \
    "logging.run_name=$RUN_NAME" "logging.wandb_mode=$WANDB_MODE" "train.output_dir=$RUN_ROOT/$RUN_NAME" \
    train.resume=auto "$@"
