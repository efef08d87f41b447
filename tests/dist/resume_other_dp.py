"""A trainer checkpoint written with one data-parallel size loads with another (TP/PP/EP kept).

    torchrun --nproc_per_node=N resume_other_dp.py --out JSON --hf-dir HF --train-file F --ckpt-dir D --save|--load

``--save`` (run with 2 processes: DP=2) takes one SAPO training step and saves; ``--load`` (run with 1 process:
DP=1) loads that checkpoint into a fresh actor. Rank 0 reports the exported weights' checksum on both sides and
the Adam step after loading, so the test can compare them.
"""

import argparse

import torch
from common import finish
from resume_check import adam_steps, train_steps

from megatron_sapo.actor import MegatronActor
from megatron_sapo.checkpoint import save_sharded
from megatron_sapo.config import load_config
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.state import initialize_model_parallel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    config = load_config(None, [
        f"model.path={args.hf_dir}", f"data.train_files=[{args.train_file}]", "rollout.n=2",
        "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "trainer.total_steps=2", "actor.optim.lr=1e-3",
        "actor.max_tokens_per_micro_batch=32", "data.max_prompt_length=16", "data.max_response_length=16",
    ])  # fmt: skip
    arch = load_arch(args.hf_dir)
    initialize_model_parallel(config.actor.megatron.layout, seed=config.actor.megatron.seed, arch=arch)
    actor = MegatronActor(config, arch)
    result = {"world_size": torch.distributed.get_world_size()}
    if args.save:
        actor.load_initial_weights()
        train_steps(actor, arch, [1])
        save_sharded(actor.sharded_state_dict(), args.ckpt_dir)
    else:
        actor.load_checkpoint(args.ckpt_dir)
        result["adam_step_after_load"] = adam_steps(actor)
    weights = dict(actor.export_hf_weights())
    result["weights_sum"] = sum(float(t.double().abs().sum()) for t in weights.values())  # rank 0's holds them
    finish(args.out, result)


if __name__ == "__main__":
    main()
