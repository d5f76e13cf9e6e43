#!/bin/bash
# ViT-L/14 on Slurm: nodes × 8 GPUs × 64 per GPU = global batch 4096 at 8 nodes; bf16, ZeRO-2,
# gradient checkpointing in both towers (conf/experiment/vitl14.yaml). Preemptible: on SIGUSR1
# (120 s before the time limit, or at preemption) it checkpoints, requeues itself and resumes.
#
#   mkdir -p logs && sbatch slurm/train_vitl.sh                  # 8 nodes
#   sbatch --nodes=16 slurm/train_vitl.sh                        # global batch 8192
#   # elastic: 4 to 8 nodes, whatever is free at each (re)start; global batch 4096 on any of them
#   sbatch --nodes=4-8 slurm/train_vitl.sh train.global_batch=4096 train.accum_steps=auto
#   CLIPDIST_TRAIN_URLS='/data/laion/{00000..41407}.tar' WANDB_MODE=online sbatch slurm/train_vitl.sh train.max_steps=50000
#
# Environment and arguments: see slurm/launch.sh.
#SBATCH --job-name=clipdist-vitl14
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
set -euo pipefail
export EXPERIMENT=${EXPERIMENT:-vitl14}
# sbatch runs a copy of this script from its spool directory: find the repo by the submit dir.
exec bash "${CLIPDIST_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" "$@"
