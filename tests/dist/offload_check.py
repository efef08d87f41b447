"""Offload really frees the DDP param/grad buffers' storage and reload restores the same values.

    torchrun --nproc_per_node=N offload_check.py --out JSON --hf-dir HF --train-file F [key=value ...]
"""

import argparse

import torch
from common import finish

from megatron_sapo.actor import MegatronActor
from megatron_sapo.config import load_config
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.offload import ddp_buffers, device_bytes
from megatron_sapo.parallel.state import initialize_model_parallel

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--hf-dir", required=True)
parser.add_argument("--train-file", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
config = load_config(None, [f"model.path={args.hf_dir}", f"data.train_files=[{args.train_file}]", "trainer.total_steps=1", "model.dtype=float32",
                            "actor.megatron.param_offload=true", "actor.megatron.grad_offload=true",
                            "actor.megatron.optimizer_offload=true", "rollout.n=2", "data.train_batch_size=2",
                            "actor.ppo_mini_batch_size=2", "data.max_prompt_length=32", "data.max_response_length=8",
                            *args.overrides])  # fmt: skip
arch = load_arch(args.hf_dir)
initialize_model_parallel(config.actor.megatron.layout, arch=arch)
actor = MegatronActor(config, arch)
actor.load_initial_weights()
for buffer in ddp_buffers(actor.model):
    buffer.grad_data.fill_(1.0)  # a stale gradient: reload must hand back zeroed gradients
before = [p.detach().clone() for p in actor.model[0].parameters()]
resident = device_bytes(actor.model)
actor.offload()
offloaded = device_bytes(actor.model)
host_copies = [buffer.param_data_cpu.clone() for buffer in ddp_buffers(actor.model)]
actor.reload()
after = list(actor.model[0].parameters())
result = {
    "resident": resident,
    "offloaded": offloaded,
    "reloaded": device_bytes(actor.model),
    "params_restored": all(torch.equal(a, b) for a, b in zip(before, after)),
    "host_copy_bytes": sum(c.numel() * c.element_size() for c in host_copies),
    "grads_zero_after_reload": all(bool((buffer.grad_data == 0).all()) for buffer in ddp_buffers(actor.model)),
}
finish(args.out, result)
