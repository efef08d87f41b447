#!/usr/bin/env bash
# SAPO on Qwen3-30B-A3B: one torchrun per node (one process per GPU). Run it from the repository root:
#
#   HF_MODEL_PATH=/data/Qwen3-30B-A3B bash recipes/qwen3_30b_a3b/train.sh data.train_files=[/data/dapo.parquet]
#
# Arguments are key=value overrides of the config. Environment knobs (defaults in brackets):
#   CONFIG          recipe YAML                      [recipes/qwen3_30b_a3b/config.yaml]
#   HF_MODEL_PATH   HF checkpoint folder             [/path/to/Qwen3-30B-A3B]
#   MCORE_CKPT      Megatron checkpoint of it; converted from HF_MODEL_PATH first if missing  [${HF_MODEL_PATH}_mcore]
#   CONVERT_ONLY    1: convert if needed and exit (sbatch.slurm does this once before the multi-node launch) [0]
#   GPUS_PER_NODE [8]  NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   OMP_NUM_THREADS threads per rank for the CPU Adam of the hybrid optimizer  [usable cores / GPUS_PER_NODE]
# Check the memory plan first: python -m megatron_sapo.plan --config "$CONFIG" --nodes "$NNODES" "$@"
set -euo pipefail

CONFIG=${CONFIG:-recipes/qwen3_30b_a3b/config.yaml}
HF_MODEL_PATH=${HF_MODEL_PATH:-/path/to/Qwen3-30B-A3B}
MCORE_CKPT=${MCORE_CKPT:-${HF_MODEL_PATH%/}_mcore}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# Each rank's CPU Adam (optimizer_cpu_offload) updates its ~3.8B expert params on OMP threads; torchrun sets
# OMP_NUM_THREADS=1 when it is unset, which leaves it one core. nproc counts the cores this job may use.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUS_PER_NODE > 0 ? $(nproc) / GPUS_PER_NODE : 1 ))}
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS per rank ($(nproc) cores, $GPUS_PER_NODE ranks)" >&2
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron overlaps TP/EP communication with compute only with this
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation

if [[ ! -d "$MCORE_CKPT" ]]; then
  if [[ "$NNODES" -gt 1 && "${CONVERT_ONLY:-0}" != 1 ]]; then
    echo "error: $MCORE_CKPT does not exist; convert once first (CONVERT_ONLY=1 bash $0, as sbatch.slurm does)" >&2
    exit 2
  fi
  # The converter writes MCORE_CKPT.tmp and renames it when complete; EP over the node's GPUs shards the experts.
  torchrun --standalone --nproc_per_node="$GPUS_PER_NODE" tools/convert_hf_to_mcore.py \
    --hf-dir "$HF_MODEL_PATH" --out "$MCORE_CKPT" --ep "$GPUS_PER_NODE"
fi
if [[ "${CONVERT_ONLY:-0}" == 1 ]]; then
  exit 0
fi

exec torchrun --nproc_per_node="$GPUS_PER_NODE" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m megatron_sapo.train --config "$CONFIG" \
  model.path="$HF_MODEL_PATH" model.mcore_checkpoint="$MCORE_CKPT" "$@"
