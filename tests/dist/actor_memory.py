"""What the actor really allocates per rank, next to what ``megatron_sapo.plan`` says, for several layouts.

    torchrun --nproc_per_node=N actor_memory.py --out JSON --hf-dir HF --train-file F --layouts JSON

``--layouts`` maps a name to ``key=value`` overrides. For each, every rank builds the actor (bf16, the ordinary
distributed optimizer with its Adam state allocated as megatron's ``init_state_fn`` does) and measures the storage
of its DDP param and grad buffers and of the optimizer's own device tensors. Rank 0 writes
``{name: [{"real": {...}, "plan": {...}, "offloaded": {...}, "reloaded": {...}} per rank]}``, the last two measured
after ``actor.offload()`` and ``actor.reload()`` (the layouts' own offload switches).
"""

import argparse
import json

import torch.distributed as dist
from common import finish

from megatron_sapo import plan
from megatron_sapo.actor import MegatronActor
from megatron_sapo.config import load_config
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.offload import ddp_buffers, optimizer_device_bytes
from megatron_sapo.parallel.state import initialize_model_parallel


def measure(actor: MegatronActor) -> dict[str, int]:
    buffers = list(ddp_buffers(actor.model))
    return {
        "params": sum(b.param_data.untyped_storage().nbytes() for b in buffers),
        "grads": sum(b.grad_data.untyped_storage().nbytes() for b in buffers),
        "optimizer": optimizer_device_bytes(actor.optimizer),
    }


def planned(config, arch, world: int) -> dict[str, int]:
    from megatron.core import parallel_state as ps

    memory = plan.plan_memory(config, arch, world)
    stage = next(s for s in memory.stages if s.params.stage == ps.get_pipeline_model_parallel_rank())
    return {
        "params": stage.row(f"params ({config.model.dtype})").training,
        "grads": stage.row("grads (fp32)").training,
        "optimizer": stage.row("optimizer").training,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--layouts", required=True)
    args = parser.parse_args()
    arch = load_arch(args.hf_dir)
    results = {}
    for name, overrides in json.loads(args.layouts).items():
        config = load_config(None, [f"model.path={args.hf_dir}", f"data.train_files=[{args.train_file}]", "trainer.total_steps=1",
                                    "model.dtype=bfloat16", "rollout.n=2", "data.train_batch_size=2",
                                    "actor.ppo_mini_batch_size=2", "data.max_prompt_length=32",
                                    "data.max_response_length=8", *overrides])  # fmt: skip
        initialize_model_parallel(config.actor.megatron.layout, arch=arch)
        world = dist.get_world_size()
        actor = MegatronActor(config, arch)
        actor._allocate_torch_optimizer_state()  # exp_avg / exp_avg_sq, as at the first step
        if config.actor.megatron.optimizer_cpu_offload:
            for optimizer in actor.optimizer.chained_optimizers:  # the hybrid optimizer's state, by a step
                optimizer.optimizer.dummy_step()
            actor.load_initial_weights()
        row = {"real": measure(actor), "plan": planned(config, arch, world)}
        actor.offload()
        row["offloaded"] = measure(actor)
        actor.reload()
        row["reloaded"] = measure(actor)
        everyone = [None] * world
        dist.all_gather_object(everyone, row)
        results[name] = everyone
    finish(args.out, results)


if __name__ == "__main__":
    main()
