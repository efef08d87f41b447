#!/usr/bin/env bash
# SAPO on Qwen2.5-7B-Instruct (the seed's example 2): one torchrun on one node, one process per GPU. Run it from
# the repository root:
#
#   HF_MODEL_PATH=/data/Qwen2.5-7B-Instruct bash recipes/qwen2_5_7b/train.sh data.train_files=[/data/train.parquet]
#
# Arguments are key=value overrides of the config. Environment knobs (defaults in brackets):
#   CONFIG          recipe YAML                      [recipes/qwen2_5_7b/config.yaml]
#   HF_MODEL_PATH   HF checkpoint folder             [/path/to/Qwen2.5-7B-Instruct]
#   MCORE_CKPT      Megatron checkpoint of it; converted from HF_MODEL_PATH first if missing  [${HF_MODEL_PATH}_mcore]
#   GPUS_PER_NODE   processes (GPUs) on this node    [8]
# Check the memory plan first: python -m megatron_sapo.plan --config "$CONFIG" --nodes 1 "$@"
set -euo pipefail

CONFIG=${CONFIG:-recipes/qwen2_5_7b/config.yaml}
HF_MODEL_PATH=${HF_MODEL_PATH:-/path/to/Qwen2.5-7B-Instruct}
MCORE_CKPT=${MCORE_CKPT:-${HF_MODEL_PATH%/}_mcore}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron overlaps TP communication with compute only with this
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation

if [[ ! -d "$MCORE_CKPT" ]]; then
  # 15 GB of bf16 weights stream through one process; the checkpoint loads under any layout (the trainer's TP 2).
  # The converter writes MCORE_CKPT.tmp and renames it when complete.
  torchrun --standalone --nproc_per_node=1 tools/convert_hf_to_mcore.py --hf-dir "$HF_MODEL_PATH" --out "$MCORE_CKPT"
fi

exec torchrun --standalone --nproc_per_node="$GPUS_PER_NODE" \
  -m megatron_sapo.train --config "$CONFIG" \
  model.path="$HF_MODEL_PATH" model.mcore_checkpoint="$MCORE_CKPT" trainer.n_gpus_per_node="$GPUS_PER_NODE" "$@"
