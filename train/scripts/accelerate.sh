#!/usr/bin/env bash
# accelerate launch (DeepSpeed comes from the recipe through the Trainer integration):
#   bash train/scripts/accelerate.sh train/recipes/mirage_stage1.yaml 8 [--set k=v ...]
set -euo pipefail
RECIPE=$1; NPROC=${2:-8}; shift 2 || shift $#
accelerate launch --num_processes "$NPROC" --num_machines "${NNODES:-1}" --machine_rank "${NODE_RANK:-0}" \
  --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "${MASTER_PORT:-29500}" \
  train/sft.py --config "$RECIPE" "$@"
