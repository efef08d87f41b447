"""The Megatron actor against a plain transformers + torch.optim.Adam computation of the same SAPO update.

    torchrun --nproc_per_node=N actor_step.py --out JSON --hf-dir HF --train-file F [key=value ...]

Rank 0 reports: the actor's old log-probs vs transformers' (temperature-scaled) log-probs of the same tokens, and
the weights after two SAPO optimizer steps (two mini-batches, several length-bucketed micro-batches each) vs the
reference's, plus both gradient norms of the first step. With ``--critic`` the same for the critic (values, two
value-loss steps), against transformers' trunk (hidden states after the final norm) times the head weight.
"""

import argparse
import dataclasses
import tempfile

import torch
from common import finish

from megatron_sapo.actor import MegatronActor
from megatron_sapo.batch import Samples, response_aligned
from megatron_sapo.checkpoint import save_sharded
from megatron_sapo.config import load_config
from megatron_sapo.convert.megatron_io import unwrap_model
from megatron_sapo.critic import MegatronCritic, initial_head_weight
from megatron_sapo.loss import compute_advantages, policy_loss, value_loss
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.state import initialize_model_parallel, is_rank0

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


CLIPRANGE_VALUE = 0.2


def critic_reference(hf_dir, samples, mini_batches, head, lr, betas, eps):
    """Plain single-process critic: transformers' trunk, ``hidden @ head + bias`` (bias 0 at first), the loss
    package's value loss, torch Adam. Returns the values before and after the two steps and each step's gradient
    norm."""
    from transformers import AutoModelForCausalLM

    trunk = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).model
    head, bias = torch.nn.Parameter(head.clone()), torch.nn.Parameter(torch.zeros(()))
    params = [*trunk.parameters(), head, bias]
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)

    def values(indices):
        rows = []
        for i in indices:
            sequence = torch.tensor([samples.prompt_ids[i] + samples.response_ids[i]])
            per_position = trunk(input_ids=sequence).last_hidden_state[0] @ head[0] + bias
            v = per_position[len(samples.prompt_ids[i]) - 1 : -1]  # the state before each response token
            rows.append(torch.nn.functional.pad(v, (0, samples.max_response_len - len(v))))
        return torch.stack(rows)

    with torch.no_grad():
        initial = values(range(len(samples)))
    grad_norms = []
    for mini_batch in mini_batches:
        loss, _ = value_loss(values(mini_batch), samples.values[mini_batch], samples.returns[mini_batch],
                             samples.response_mask()[mini_batch], cliprange_value=CLIPRANGE_VALUE)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        grad_norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)).item())
        optimizer.step()
    with torch.no_grad():
        return initial, grad_norms, values(range(len(samples)))


def token_classification_check(config, arch, args, samples) -> float:
    """critic.model.path = a transformers *ForTokenClassification export (one label): its score.weight is the head,
    and the critic's values are that model's logits at the states before the response tokens (one process)."""
    from transformers import AutoModelForTokenClassification

    config = dataclasses.replace(config, critic=dataclasses.replace(
        config.critic, model=dataclasses.replace(config.critic.model, path=args.critic_hf_dir)))  # fmt: skip
    critic = MegatronCritic(config, arch)
    critic.load_initial_weights()
    values = critic.compute_values(samples).cpu()
    model = AutoModelForTokenClassification.from_pretrained(args.critic_hf_dir, dtype=torch.float32).eval()
    diff = 0.0
    for i, (prompt, response) in enumerate(zip(samples.prompt_ids, samples.response_ids)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, :, 0]
        expected = logits[len(prompt) - 1 : -1]
        diff = max(diff, (values[i, : len(response)] - expected).abs().max().item())
    return diff


def critic_check(config, arch, args, samples, mini_batches, lr, betas, eps) -> dict:
    critic = MegatronCritic(config, arch)
    critic.load_initial_weights()
    before = critic.compute_values(samples).cpu()
    # With model.mcore_checkpoint (and no critic.model.path) the trunk comes from that checkpoint, less its LM head.
    from_mcore = MegatronCritic(dataclasses.replace(config, model=dataclasses.replace(
        config.model, mcore_checkpoint=args.out + ".mcore")), arch)  # fmt: skip
    from_mcore.load_initial_weights()
    mcore_diff = (from_mcore.compute_values(samples).cpu() - before).abs().max().item()
    del from_mcore
    mask = samples.response_mask()
    g = torch.Generator().manual_seed(7)
    # Old values off the current ones (so that the clip is active on some tokens) and fixed targets.
    samples.values = (before + torch.randn(before.shape, generator=g) * 0.3) * mask
    samples.returns = torch.randn(before.shape, generator=g) * mask
    metrics = critic.update(samples, mini_batches)
    after = critic.compute_values(samples).cpu()
    if not is_rank0():
        return {}
    head = initial_head_weight(arch.hidden_size, config.actor.megatron.seed)
    ref_before, ref_grad_norms, ref_after = critic_reference(args.hf_dir, samples, mini_batches, head, lr, betas, eps)
    on = mask.bool()

    def loss(values):
        return value_loss(values, samples.values, samples.returns, mask, cliprange_value=CLIPRANGE_VALUE)[0].item()

    result = {}
    if args.critic_hf_dir:
        result["token_classification_value_max_abs_diff"] = token_classification_check(config, arch, args, samples)
    return {
        **result,
        "mcore_checkpoint_value_max_abs_diff": mcore_diff,
        "value_max_abs_diff": (before - ref_before)[on].abs().max().item(),
        "value_after_update_max_abs_diff": (after - ref_after)[on].abs().max().item(),
        "values_zero_off_mask": bool((before[~on] == 0).all()),
        "reference_grad_norms": ref_grad_norms,
        "vf_loss_before": loss(before),
        "vf_loss_after": loss(after),
        "metrics": metrics,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--critic", action="store_true")
    parser.add_argument("--critic-hf-dir", help="with --critic, one process: a *ForTokenClassification export")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    lr, betas, eps = 1e-3, (0.9, 0.999), 1e-6
    critic = ["algorithm.adv_estimator=gae", f"critic.optim.lr={lr}", f"critic.optim.adam_eps={eps}",
              "critic.optim.weight_decay=0", "critic.optim.clip_grad=0",
              f"critic.cliprange_value={CLIPRANGE_VALUE}"]  # fmt: skip
    config = load_config(None, [
        f"model.path={args.hf_dir}", f"data.train_files=[{args.train_file}]", "trainer.total_steps=1", "model.dtype=float32",
        f"rollout.temperature={TEMPERATURE}", "rollout.n=2", "data.train_batch_size=4", "actor.ppo_mini_batch_size=2",
        f"actor.optim.lr={lr}", f"actor.optim.adam_eps={eps}", "actor.optim.weight_decay=0", "actor.optim.clip_grad=0",
        "actor.max_tokens_per_micro_batch=48", "data.max_prompt_length=16", "data.max_response_length=16",
        *(critic if args.critic else []), *args.overrides,
    ])  # fmt: skip
    arch = load_arch(args.hf_dir)
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
    if args.critic:  # the initial policy as a Megatron checkpoint, for model.mcore_checkpoint
        save_sharded({"model": unwrap_model(actor.model[0]).sharded_state_dict()}, args.out + ".mcore")
    metrics = actor.update(samples, mini_batches)
    updated = dict(actor.export_hf_weights())
    critic_result = critic_check(config, arch, args, samples, mini_batches, lr, betas, eps) if args.critic else None

    result = None
    if is_rank0():
        initial, ref_grad_norms, ref_weights = reference(args.hf_dir, samples, mini_batches, lr, betas, eps)
        mask = samples.response_mask().bool()
        result = {
            "log_prob_max_abs_diff": (current - initial)[mask].abs().max().item(),
            "max_abs_weight_diff": max((updated[n] - ref_weights[n]).abs().max().item() for n in ref_weights),
            "reference_grad_norms": ref_grad_norms,
            "metrics": metrics,
            "critic": critic_result,
        }
    finish(args.out, result)


if __name__ == "__main__":
    main()
