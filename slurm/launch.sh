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
# ($EXPERIMENT-<job id>), RUN_ROOT ($CLIPDIST_ROOT/runs), CLIPDIST_TASKS_PER_NODE (ranks per
# node; default: sbatch's --ntasks-per-node, else the node's GPUs). Arguments: Hydra overrides.
set -euo pipefail
: "${EXPERIMENT:?EXPERIMENT is not set: submit slurm/train_rn50.sh or slurm/train_vitl.sh, or set it}"
CLIPDIST_ROOT=${CLIPDIST_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-$CLIPDIST_ROOT/.venv/bin/python}
RUN_NAME=${RUN_NAME:-$EXPERIMENT-${SLURM_JOB_ID:-local}}
RUN_ROOT=${RUN_ROOT:-$CLIPDIST_ROOT/runs}
WANDB_MODE=${WANDB_MODE:-offline}
cd "$CLIPDIST_ROOT"

# One rank per GPU. The scripts ask for whole nodes and no task count: Slurm fixes a job's task
# count when it first starts, so a job that asked --ntasks-per-node could never be requeued onto
# fewer nodes (elastic resume: sbatch --nodes=MIN-MAX). Ranks per node: CLIPDIST_TASKS_PER_NODE,
# else sbatch's --ntasks-per-node, else the node's GPUs; the node's CPUs are shared among them.
TASKS_PER_NODE=${CLIPDIST_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-1} / TASKS_PER_NODE > 0 ? ${SLURM_CPUS_ON_NODE:-1} / TASKS_PER_NODE : 1 ))}
echo "$(date +%T) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
    "$(( ${SLURM_JOB_NUM_NODES:-1} * TASKS_PER_NODE )) ranks, run $RUN_ROOT/$RUN_NAME"
# --kill-on-bad-exit: a rank that fails ends its peers at once instead of leaving them in a
# collective (the watchdog, train.fault_timeout_s, covers the ranks that hang rather than exit).
srun --kill-on-bad-exit=1 --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" "$PYTHON" -m clipdist.train "+experiment=$EXPERIMENT" \
    "logging.run_name=$RUN_NAME" "logging.wandb_mode=$WANDB_MODE" "train.output_dir=$RUN_ROOT/$RUN_NAME" \
    train.resume=auto "$@"
