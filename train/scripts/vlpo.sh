#!/usr/bin/env bash
# VLPO (RL) from a recipe; DeepSpeed comes from the recipe through the Trainer integration:
#   bash train/scripts/vlpo.sh train/recipes/vlpo_monet.yaml 8 [--set vlpo.beta=0.0 ...]    one node, 8 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash train/scripts/vlpo.sh RECIPE 8 ...         several nodes (torchrun)
# No GPU: the same on N CPU processes with gloo (DS_ACCELERATOR=cpu), what the tests run.
set -euo pipefail
RECIPE=$1; NPROC=${2:-8}; shift 2 || shift $#
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$NPROC" train/vlpo.py --config "$RECIPE" "$@"
