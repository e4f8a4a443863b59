#!/bin/bash
# torchrun launch (Lightning detects torchelastic; one process per GPU). Single node:
#   experiments/launch/torchrun.sh 8 experiments/released/varedit_2b_256.yaml trainer=fsdp2
# Multi-node: run on every node with NNODES, NODE_RANK and MASTER_ADDR set (MASTER_PORT optional):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 experiments/launch/torchrun.sh 8 CONFIG trainer=fsdp2
# The start-up check verifies WORLD_SIZE == trainer.devices x trainer.num_nodes.
set -euo pipefail
GPUS=${1:?usage: torchrun.sh GPUS_PER_NODE EXPERIMENT.yaml [key=value ...]}
CONFIG=${2:?usage: torchrun.sh GPUS_PER_NODE EXPERIMENT.yaml [key=value ...]}
shift 2
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ]; then
    # --standalone picks a free port: concurrent jobs on one machine do not collide on 29500.
    RDZV=(--standalone)
else
    RDZV=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --rdzv_backend=c10d
          --rdzv_endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec torchrun "${RDZV[@]}" --nproc_per_node="$GPUS" -m varedit_lab.cli train "$CONFIG" \
    trainer.devices="$GPUS" trainer.num_nodes="$NNODES" "$@"
