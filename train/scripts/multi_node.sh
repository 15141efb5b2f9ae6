#!/usr/bin/env bash
# Several nodes: a DeepSpeed hostfile ("node1 slots=8" per line), run from the first node:
#   bash train/scripts/multi_node.sh hostfile train/recipes/mirage_stage1.yaml [--set k=v ...]
set -euo pipefail
HOSTFILE=$1; RECIPE=$2; shift 2
deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" train/sft.py --config "$RECIPE" "$@"
