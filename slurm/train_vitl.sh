#!/bin/bash
# ViT-L/14 on Slurm: nodes × 8 GPUs × 64 per GPU = global batch 4096 at 8 nodes; bf16, ZeRO-2,
# gradient checkpointing in both towers (conf/experiment/vitl14.yaml).
#
#   sbatch slurm/train_vitl.sh                        # 8 nodes
#   sbatch --nodes=16 slurm/train_vitl.sh             # 8192 global batch
#   CLIPDIST_TRAIN_URLS='/data/laion/{00000..41407}.tar' WANDB_MODE=online sbatch slurm/train_vitl.sh train.max_steps=50000
#
# Environment (all optional): CLIPDIST_ROOT (repo, default: submit dir), PYTHON (default
# $CLIPDIST_ROOT/.venv/bin/python), GPUS_PER_NODE (8), CLIPDIST_TRAIN_URLS (shard pattern),
# WANDB_MODE (offline), RUN_NAME (vitl14-<job id>), RUN_ROOT (runs). Arguments are Hydra overrides.
#SBATCH --job-name=clipdist-vitl14
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120

set -euo pipefail
export CLIPDIST_ROOT=${CLIPDIST_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
export PYTHON=${PYTHON:-$CLIPDIST_ROOT/.venv/bin/python}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export WANDB_MODE=${WANDB_MODE:-offline}
export RUN_NAME=${RUN_NAME:-vitl14-${SLURM_JOB_ID:-local}}
export RUN_ROOT=${RUN_ROOT:-$CLIPDIST_ROOT/runs}
export EXPERIMENT=${EXPERIMENT:-vitl14}
if [ -n "${CLIPDIST_TRAIN_URLS:-}" ]; then export CLIPDIST_TRAIN_URLS; fi
mkdir -p "$CLIPDIST_ROOT/logs"

echo "$(date +%T) job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_JOB_NUM_NODES:-1} nodes × $GPUS_PER_NODE GPUs, restart ${SLURM_RESTART_COUNT:-0}"
# One torchrun launcher per node; each derives the rendezvous from Slurm's variables.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash "$CLIPDIST_ROOT/slurm/node_launch.sh" "$@"
