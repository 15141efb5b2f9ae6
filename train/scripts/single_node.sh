#!/usr/bin/env bash
# One node, N GPUs:  bash train/scripts/single_node.sh train/recipes/mirage_stage1.yaml 8 [--set k=v ...]
set -euo pipefail
RECIPE=$1; NGPUS=${2:-8}; shift 2 || shift $#
deepspeed --num_gpus "$NGPUS" train/sft.py --config "$RECIPE" "$@"
