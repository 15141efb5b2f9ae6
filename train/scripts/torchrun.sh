#!/usr/bin/env bash
# torchrun on one node (the recipe's `deepspeed:` config still drives ZeRO):
#   bash train/scripts/torchrun.sh train/recipes/mirage_stage1.yaml 8 [--set k=v ...]
# several nodes: NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash train/scripts/torchrun.sh ...
set -euo pipefail
RECIPE=$1; NPROC=${2:-8}; shift 2 || shift $#
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$NPROC" train/sft.py --config "$RECIPE" "$@"
