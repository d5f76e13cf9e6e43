#!/usr/bin/env bash
# The digits quickstart in one command: install, write shards, train on 2 CPU ranks, print
# the zero-shot accuracy and retrieval recall. Extra arguments are Hydra overrides, e.g.
# train.max_steps=50. The digits step also rewrites shards of an older clipdist's format.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/python -m clipdist.data.digits --out data/digits
exec .venv/bin/torchrun --standalone --nproc_per_node 2 -m clipdist.train +experiment=digits "$@"
