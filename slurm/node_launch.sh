#!/bin/bash
# Runs once per node under srun: rendezvous from Slurm's variables (clipdist/distributed.py),
# then torchrun starts GPUS_PER_NODE ranks. Called by the sbatch scripts in this folder.
set -euo pipefail
cd "$CLIPDIST_ROOT"
# Prints MASTER_ADDR, MASTER_PORT, NODE_RANK, NNODES as shell assignments.
eval "$("$PYTHON" -m clipdist.distributed rendezvous)"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m clipdist.train "+experiment=$EXPERIMENT" \
    "launch.nodes=$NNODES" "launch.gpus_per_node=$GPUS_PER_NODE" \
    "logging.run_name=$RUN_NAME" "logging.wandb_mode=$WANDB_MODE" \
    "train.output_dir=$RUN_ROOT/$RUN_NAME" \
    "$@"
