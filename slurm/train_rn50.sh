#!/bin/bash
# RN50 (OpenAI's ModifiedResNet) on Slurm: nodes × 8 GPUs × 128 per GPU = global batch 4096 at
# 4 nodes (conf/experiment/rn50.yaml). Preemptible: on SIGUSR1 (120 s before the time limit, or
# at preemption) it checkpoints, requeues itself and resumes.
#
#   mkdir -p logs && sbatch slurm/train_rn50.sh
#   CLIPDIST_TRAIN_URLS='/data/cc12m/{00000..01242}.tar' sbatch --nodes=2 slurm/train_rn50.sh train.accum_steps=2
#   # the CPU smoke run of tests/test_slurm.py: 2 ranks on one node, no GPU
#   EXPERIMENT=tiny sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 slurm/train_rn50.sh
#
# Environment and arguments: see slurm/launch.sh.
#SBATCH --job-name=clipdist-rn50
#SBATCH --nodes=4
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
set -euo pipefail
export EXPERIMENT=${EXPERIMENT:-rn50}
# sbatch runs a copy of this script from its spool directory: find the repo by the submit dir.
exec bash "${CLIPDIST_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" "$@"
