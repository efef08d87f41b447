"""Resume from a later checkpoint: the actor stopped after step ``--save-at`` and resumed equals the uninterrupted run.

    torchrun --nproc_per_node=2 resume_check.py --out JSON --hf-dir HF --train-file F --variant NAME [...]

For each ``--variant`` (``fp32``, ``bf16``, ``offload``: fp32 with param/grad/optimizer offload between steps as
the trainer does it; ``gae``: that with the critic, which makes GAE advantages and trains before the actor (from
step 3 on: the checkpoint holds an actor optimizer that has not stepped), is offloaded with it and saved in the
checkpoint's ``critic/`` folder) one actor trains ``--steps`` steps on fixed
synthetic SAPO batches (two optimizer steps per training step) and saves a trainer checkpoint after step
``--save-at``; a second, fresh actor loads that checkpoint and trains the remaining steps on the same batches. Rank 0
reports, per variant, both runs' per-step metrics, the largest difference of the final weights, and the Adam
``step`` state right after loading (its values and whether the parameters share one tensor).
"""

import argparse
import os

import torch
from common import finish

from megatron_sapo.actor import MegatronActor
from megatron_sapo.batch import Samples, response_aligned
from megatron_sapo.checkpoint import save_sharded
from megatron_sapo.config import load_config
from megatron_sapo.convert.megatron_io import unwrap_model
from megatron_sapo.critic import MegatronCritic
from megatron_sapo.loss import compute_advantages, gae_advantages
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.state import initialize_model_parallel, is_rank0

VARIANTS = {
    "fp32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "offload": ["model.dtype=float32", "actor.megatron.param_offload=true", "actor.megatron.grad_offload=true",
                "actor.megatron.optimizer_offload=true"],
    "gae": ["model.dtype=float32", "algorithm.adv_estimator=gae", "algorithm.gamma=0.9", "algorithm.lam=0.8",
            "critic.optim.lr=1e-3", "critic.ppo_epochs=2", "trainer.critic_warmup=3",
            "actor.megatron.param_offload=true", "actor.megatron.grad_offload=true",
            "actor.megatron.optimizer_offload=true"],
}  # fmt: skip


def step_samples(vocab: int, step: int) -> tuple[Samples, list[int], list[float]]:
    """A different fixed batch for every step: 8 samples in 4 groups, rewards with a spread in each group."""
    g = torch.Generator().manual_seed(100 + step)
    prompts = [torch.randint(1, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(8)]  # fmt: skip
    responses = [torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(8)]  # fmt: skip
    rewards = torch.rand(8, generator=g).tolist()
    return Samples(prompt_ids=prompts, response_ids=responses), [0, 0, 1, 1, 2, 2, 3, 3], rewards


def train_steps(actor: MegatronActor, arch, steps, critic: MegatronCritic | None = None) -> dict[int, dict]:
    metrics = {}
    trained = [actor] + ([critic] if critic is not None else [])
    for step in steps:
        for model in trained:
            model.reload()
        samples, groups, rewards = step_samples(arch.vocab_size, step)
        samples.old_log_probs = actor.compute_log_probs(samples).cpu()
        if critic is None:
            samples.advantages = compute_advantages("grpo", rewards=torch.tensor(rewards),
                                                    response_mask=samples.response_mask(),
                                                    group_index=torch.tensor(groups))  # fmt: skip
        else:
            samples.values = critic.compute_values(samples).cpu()
            samples.advantages, samples.returns = gae_advantages(
                torch.tensor(rewards), samples.values, samples.response_mask().bool(), gamma=0.9, lam=0.8
            )
        samples.rollout_log_probs = response_aligned([[0.0] * len(r) for r in samples.response_ids],
                                                     samples.max_response_len)  # fmt: skip
        mini_batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
        metrics[step] = {}
        if critic is not None:
            metrics[step].update({f"critic/{k}": v for k, v in critic.update(samples, mini_batches).items()})
        if critic is None or step >= actor.config.trainer.critic_warmup:  # the trainer's warm-up rule
            metrics[step].update(actor.update(samples, mini_batches))
        for model in trained:
            model.offload()
    for model in trained:
        model.reload()
    return metrics


def critic_params(critic: MegatronCritic | None) -> dict[str, torch.Tensor]:
    if critic is None:
        return {}
    return {name: p.detach().clone() for name, p in unwrap_model(critic.model[0]).named_parameters()}


def adam_steps(actor: MegatronActor) -> dict:
    states = [s for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
              for s in opt.optimizer.state.values() if "step" in s]  # fmt: skip
    return {"values": sorted({float(s["step"]) for s in states}), "count": len(states),
            "distinct_tensors": len({id(s["step"]) for s in states})}  # fmt: skip


def run_variant(args, variant: str, ckpt_root: str) -> dict:
    config = load_config(None, [
        f"model.path={args.hf_dir}", f"data.train_files=[{args.train_file}]", "rollout.n=2",
        "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", f"trainer.total_steps={args.steps}",
        "actor.optim.lr=1e-3", "actor.optim.clip_grad=1.0", "actor.max_tokens_per_micro_batch=32",
        "data.max_prompt_length=16", "data.max_response_length=16", "actor.megatron.expert_model_parallel_size=2",
        *VARIANTS[variant],
    ])  # fmt: skip
    arch = load_arch(args.hf_dir)
    initialize_model_parallel(config.actor.megatron.layout, seed=config.actor.megatron.seed, arch=arch)
    ckpt = os.path.join(ckpt_root, variant)

    actor = MegatronActor(config, arch)
    critic = MegatronCritic(config, arch) if config.use_critic else None
    actor.load_initial_weights()
    if critic is not None:
        critic.load_initial_weights()
    full = train_steps(actor, arch, range(1, args.save_at + 1), critic)
    actor.offload()  # the trainer saves with the state on the device: reload first, as it does
    actor.reload()
    save_sharded(actor.sharded_state_dict(), ckpt, parts={"critic": critic.sharded_state_dict()} if critic else None)
    full.update(train_steps(actor, arch, range(args.save_at + 1, args.steps + 1), critic))
    full_weights = dict(actor.export_hf_weights())
    full_critic = critic_params(critic)
    del actor, critic

    resumed_actor = MegatronActor(config, arch)
    resumed_critic = MegatronCritic(config, arch) if config.use_critic else None
    resumed_actor.load_checkpoint(ckpt)
    if resumed_critic is not None:
        resumed_critic.load_checkpoint(os.path.join(ckpt, "critic"))
    after_load = adam_steps(resumed_actor)
    critic_after_load = adam_steps(resumed_critic) if resumed_critic is not None else None
    resumed_actor.offload()
    resumed = train_steps(resumed_actor, arch, range(args.save_at + 1, args.steps + 1), resumed_critic)
    resumed_weights = dict(resumed_actor.export_hf_weights())
    resumed_critic_params = critic_params(resumed_critic)
    # Every rank compares its own critic shards; 1 where all equal, on every rank.
    critic_equal = torch.tensor(float(all(torch.equal(full_critic[n], resumed_critic_params[n]) for n in full_critic)))
    torch.distributed.all_reduce(critic_equal, op=torch.distributed.ReduceOp.MIN)
    result = {"full": full, "resumed": resumed, "adam_step_after_load": after_load,
              "critic_adam_step_after_load": critic_after_load, "critic_weights_equal": bool(critic_equal.item()),
              "critic_params": len(full_critic)}  # fmt: skip
    if is_rank0():
        result["max_abs_weight_diff"] = max((full_weights[n].float() - resumed_weights[n].float()).abs().max().item()
                                            for n in full_weights)  # fmt: skip
        result["weights_equal"] = all(torch.equal(full_weights[n], resumed_weights[n]) for n in full_weights)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=2)
    args = parser.parse_args()
    results = {variant: run_variant(args, variant, args.ckpt_dir) for variant in args.variant}
    finish(args.out, results)


if __name__ == "__main__":
    main()
