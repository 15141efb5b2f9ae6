#!/usr/bin/env bash
# No GPU: the same recipe on N CPU processes with gloo (what the tests run):
#   bash train/scripts/cpu.sh train/recipes/tiny/mirage_stage1.yaml 2 [--set k=v ...]
set -euo pipefail
RECIPE=$1; NPROC=${2:-2}; shift 2 || shift $#
DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  torchrun --standalone --nproc_per_node "$NPROC" train/sft.py --config "$RECIPE" "$@"
