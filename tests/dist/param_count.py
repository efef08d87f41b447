"""Build Qwen3-MoE from an HF config.json on the meta device and count its parameters."""

import argparse
import json

import torch

from megatron_sapo.models.qwen3_moe import ModelOptions, Qwen3MoeArch, build_model, count_parameters
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.parallel.state import destroy, initialize_model_parallel

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--hf-dir", required=True)
args = parser.parse_args()
arch = Qwen3MoeArch.from_hf_dir(args.hf_dir)
initialize_model_parallel(ParallelLayout(), arch=arch, training=False)
with torch.device("meta"):
    chunks = build_model(arch, ParallelLayout(), ModelOptions(params_dtype=torch.bfloat16))
total, active = count_parameters(chunks, arch)
devices = {str(p.device) for p in chunks[0].parameters()}
with open(args.out, "w") as f:
    json.dump({"total": total, "active": active, "devices": sorted(devices), "arch": arch.__dict__}, f)
destroy()
