"""The Megatron actor against a plain transformers + torch.optim.Adam computation of the same SAPO update.

    torchrun --nproc_per_node=N actor_step.py --out JSON --hf-dir HF --train-file F [key=value ...]

Rank 0 reports: the actor's old log-probs vs transformers' (temperature-scaled) log-probs of the same tokens, and
the weights after two SAPO optimizer steps (two mini-batches, several length-bucketed micro-batches each) vs the
reference's, plus both gradient norms of the first step.
"""

import argparse
import json
import tempfile

import torch

from megatron_sapo.actor import MegatronActor
from megatron_sapo.batch import Samples, response_aligned
from megatron_sapo.config import load_config
from megatron_sapo.loss import compute_advantages, policy_loss
from megatron_sapo.models.qwen3_moe import Qwen3MoeArch
from megatron_sapo.parallel.state import destroy, initialize_model_parallel, is_rank0

TEMPERATURE = 0.8


def make_samples(vocab: int) -> tuple[Samples, list[int], list[float]]:
    g = torch.Generator().manual_seed(3)
    prompts, responses = [], []
    for _ in range(8):
        prompts.append(torch.randint(1, vocab, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist())
        responses.append(torch.randint(1, vocab, (int(torch.randint(2, 13, (1,), generator=g)),), generator=g).tolist())
    samples = Samples(prompt_ids=prompts, response_ids=responses)
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0]  # every group has a spread, so every step has a gradient
    return samples, groups, rewards


def reference(hf_dir, samples, mini_batches, lr, betas, eps):
    """Plain single-process SAPO: transformers log-probs, the loss package's formula, torch Adam."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)

    def log_probs(indices):
        rows = []
        for i in indices:
            sequence = torch.tensor([samples.prompt_ids[i] + samples.response_ids[i]])
            logits = model(input_ids=sequence).logits[0] / TEMPERATURE
            start = len(samples.prompt_ids[i])
            targets = sequence[0, start:]
            lp = torch.log_softmax(logits[start - 1 : -1].float(), -1).gather(1, targets[:, None])[:, 0]
            rows.append(torch.nn.functional.pad(lp, (0, samples.max_response_len - len(lp))))
        return torch.stack(rows)

    with torch.no_grad():
        initial = log_probs(range(len(samples)))
    grad_norms = []
    for mini_batch in mini_batches:
        mask = samples.response_mask()[mini_batch]
        loss, _ = policy_loss("sapo", log_probs=log_probs(mini_batch), old_log_probs=samples.old_log_probs[mini_batch],
                              advantages=samples.advantages[mini_batch], response_mask=mask, tau_pos=1.0, tau_neg=1.05)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        grad_norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item())
        optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return initial, grad_norms, load_file(f"{tmp}/model.safetensors")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    lr, betas, eps = 1e-3, (0.9, 0.999), 1e-6
    config = load_config(None, [
        f"model.path={args.hf_dir}", f"data.train_files=[{args.train_file}]", "model.dtype=float32",
        f"rollout.temperature={TEMPERATURE}", "rollout.n=2", "data.train_batch_size=4", "actor.ppo_mini_batch_size=2",
        f"actor.optim.lr={lr}", f"actor.optim.adam_eps={eps}", "actor.optim.weight_decay=0", "actor.optim.clip_grad=0",
        "actor.max_tokens_per_micro_batch=48", "data.max_prompt_length=16", "data.max_response_length=16",
        *args.overrides,
    ])  # fmt: skip
    arch = Qwen3MoeArch.from_hf_dir(args.hf_dir)
    initialize_model_parallel(config.actor.megatron.layout, arch=arch)
    actor = MegatronActor(config, arch)
    actor.load_initial_weights()

    samples, groups, rewards = make_samples(arch.vocab_size)
    current = actor.compute_log_probs(samples).cpu()
    # Old log-probs a little off the current policy, so that SAPO's gate is not at r = 1 everywhere.
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(5)) * 0.3
    samples.old_log_probs = (current + noise) * samples.response_mask()
    samples.advantages = compute_advantages("grpo", rewards=torch.tensor(rewards), response_mask=samples.response_mask(),
                                            group_index=torch.tensor(groups))  # fmt: skip
    samples.rollout_log_probs = response_aligned([[0.0] * len(r) for r in samples.response_ids], samples.max_response_len)
    mini_batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    metrics = actor.update(samples, mini_batches)
    updated = dict(actor.export_hf_weights())

    if is_rank0():
        initial, ref_grad_norms, ref_weights = reference(args.hf_dir, samples, mini_batches, lr, betas, eps)
        mask = samples.response_mask().bool()
        result = {
            "log_prob_max_abs_diff": (current - initial)[mask].abs().max().item(),
            "max_abs_weight_diff": max((updated[n] - ref_weights[n]).abs().max().item() for n in ref_weights),
            "reference_grad_norms": ref_grad_norms,
            "metrics": metrics,
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
    destroy()


if __name__ == "__main__":
    main()
