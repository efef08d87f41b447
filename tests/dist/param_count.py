"""Build Qwen3-MoE from an HF config.json on the meta device and count its parameters."""

import argparse

import torch
from common import finish

from megatron_sapo.convert.mapping import count_parameters
from megatron_sapo.models import ModelOptions, build_model, load_arch
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.parallel.state import initialize_model_parallel

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--hf-dir", required=True)
args = parser.parse_args()
arch = load_arch(args.hf_dir)
initialize_model_parallel(ParallelLayout(), arch=arch, training=False)
with torch.device("meta"):
    chunks = build_model(arch, ParallelLayout(), ModelOptions(params_dtype=torch.bfloat16))
total, active = count_parameters(chunks, arch)
devices = {str(p.device) for p in chunks[0].parameters()}
finish(args.out, {"total": total, "active": active, "devices": sorted(devices), "arch": arch.__dict__})
