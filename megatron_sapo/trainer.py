"""The SAPO trainer, top to bottom.

Each step: prompts → rollout (``rollout.n`` samples each) → rewards (+ DAPO overlong shaping, dynamic sampling) →
old log-probs from the current Megatron policy (and reference log-probs when the KL term is on) → advantages →
one optimizer step per mini-batch (micro-batches through Megatron's pipeline schedule, loss on vocab-parallel
logits) → a checkpoint every ``trainer.save_freq`` steps → weight sync to the rollout engine → metrics.

Generation, reward scoring and logging happen on global rank 0; the sampled batch is broadcast, and everything
Megatron does is collective. With ``actor.megatron.*_offload`` the trainer's GPU state moves to host memory while
the rollout engine generates.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_sapo.actor import MegatronActor
from megatron_sapo.batch import Samples, response_aligned
from megatron_sapo.checkpoint import (
    TRAINER_STATE_FILE,
    latest_checkpoint,
    publish_latest,
    replace_dir,
    save_sharded,
    step_dir,
)
from megatron_sapo.config import Config, save_resolved_config
from megatron_sapo.data import PromptStream, load_prompts
from megatron_sapo.data.tokenizer import load_tokenizer
from megatron_sapo.loss import apply_overlong_penalty, compute_advantages, masked_mean
from megatron_sapo.metrics import MetricsLogger
from megatron_sapo.models.qwen3_moe import Qwen3MoeArch
from megatron_sapo.parallel.state import initialize_model_parallel, is_rank0
from megatron_sapo.rewards import RewardManager, RewardSample
from megatron_sapo.rewards.dynamic_sampling import fill_batch
from megatron_sapo.rollout.engine import RolloutEngine

logger = logging.getLogger("megatron_sapo")


def train(config: Config) -> str:
    """Run training; returns the output folder. Collective over torchrun's processes."""
    arch = Qwen3MoeArch.from_hf_dir(config.model.path)
    initialize_model_parallel(config.actor.megatron.layout, seed=config.actor.megatron.seed, arch=arch)
    out = config.trainer.output_dir
    checkpoints = os.path.join(out, "checkpoints")
    if is_rank0():
        save_resolved_config(config, out)

    tokenizer = load_tokenizer(config.model.path)
    stream = PromptStream(
        load_prompts(config.data, tokenizer).items, shuffle=config.data.shuffle, seed=config.data.seed
    )
    val_prompts = load_prompts(config.data, tokenizer, "val").items if config.data.val_files else []
    actor = MegatronActor(config, arch)

    resume_from = _resume_checkpoint(config, checkpoints)
    start_step = 0
    if resume_from:
        actor.load_checkpoint(resume_from)
        with open(os.path.join(resume_from, TRAINER_STATE_FILE)) as f:
            state = json.load(f)
        start_step = state["step"]
        stream.load_state_dict(state["data"])
    else:
        actor.load_initial_weights()

    # The rollout engine starts on a GPU the trainer has cleared (colocated runs offload it).
    actor.offload()
    node_servers = _launch_this_nodes_sglang(config, out)
    engine = rewards = metrics_log = None
    if is_rank0():
        engine = RolloutEngine(config.rollout, model_path=config.model.path, eos_token_id=tokenizer.eos_token_id,
                               log_dir=os.path.join(out, "rollout_logs"))  # fmt: skip
        rewards = RewardManager(config.reward)
        metrics_log = MetricsLogger(out, resume_step=start_step, tensorboard=config.trainer.tensorboard,
                                    wandb_project=config.trainer.wandb_project)  # fmt: skip
    if resume_from:  # the engine loaded model.path; it needs the resumed policy
        actor.reload()
        _sync_weights(actor, engine, config)
        actor.offload()
    if val_prompts and config.trainer.val_before_train and start_step == 0 and is_rank0():
        metrics_log.log(0, _validate(config, val_prompts, engine, rewards, tokenizer))

    progress = tqdm(range(start_step + 1, config.trainer.total_steps + 1), desc="steps", disable=not is_rank0(),
                    initial=start_step, total=config.trainer.total_steps)  # fmt: skip
    try:
        for step in progress:
            timings: dict[str, float] = {}
            metrics: dict[str, float] = {}

            # 1. Rollout and rewards (rank 0; the trainer's GPU state sits on the host meanwhile).
            with _timer(timings, "rollout"):
                batch = (
                    _generate_batch(config, stream, engine, rewards, tokenizer, step, metrics) if is_rank0() else None
                )
                batch = _broadcast(batch)
            _engine_memory(engine, config, release=True)
            actor.reload()
            stream.load_state_dict(batch["data_state"])  # every rank follows rank 0's draws
            samples = batch["samples"]

            # 2. Log-probs of the sampled tokens under the current policy (and the frozen reference).
            with _timer(timings, "old_log_probs"):
                samples.old_log_probs = actor.compute_log_probs(samples)
                if config.actor.use_kl_loss:
                    samples.ref_log_probs = actor.compute_log_probs(samples, reference=True)

            # 3. Advantages from the (shaped) rewards, per group of rollout.n samples.
            mask = samples.response_mask()
            samples.advantages = compute_advantages(
                config.algorithm.adv_estimator,
                rewards=torch.tensor(batch["scores"]),
                response_mask=mask,
                group_index=torch.tensor(batch["group_index"]),
                gamma=config.algorithm.gamma,
                lam=config.algorithm.lam,
                norm_by_std=config.algorithm.norm_adv_by_std_in_grpo,
            )

            # 4. The policy update: one optimizer step per mini-batch of ppo_mini_batch_size prompts.
            with _timer(timings, "update"):
                update_metrics = actor.update(samples, _mini_batches(batch["group_index"], config))

            # 5. A checkpoint, while the trainer's state is on the GPU (before it is offloaded for the next rollout).
            if _due(config.trainer.save_freq, step, config.trainer.total_steps):
                _save(actor, stream, step, checkpoints, config)

            # 6. The rollout engine gets the new weights; then it has the GPU again.
            with _timer(timings, "weight_sync"):
                _engine_memory(engine, config, tags=["weights"])
                _sync_weights(actor, engine, config)
                actor.offload()
                _engine_memory(engine, config, tags=["kv_cache"])

            # 7. Metrics, and validation on data.val_files with the new weights.
            metrics.update({f"actor/{k}": v for k, v in update_metrics.items()})
            metrics["rollout/logprob_diff"] = float(
                masked_mean((samples.old_log_probs.cpu() - samples.rollout_log_probs).abs(), mask)
            )
            metrics["response_length/mean"] = float(mask.sum(-1).mean())
            num_tokens = sum(samples.lengths())
            metrics.update({f"timing/{k}": v for k, v in timings.items()})
            metrics["perf/tokens_per_s"] = num_tokens / max(sum(timings.values()), 1e-9)
            if val_prompts and is_rank0() and _due(config.trainer.test_freq, step, config.trainer.total_steps):
                with _timer(timings, "validation"):
                    metrics.update(_validate(config, val_prompts, engine, rewards, tokenizer))
                metrics["timing/validation"] = timings["validation"]
            if is_rank0():
                metrics_log.log(step, metrics)
                progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
    finally:
        if engine is not None:
            engine.shutdown()
        for process in node_servers:
            process.stop()
        if rewards is not None:
            rewards.close()
        if metrics_log is not None:
            metrics_log.close()

    if config.trainer.export_hf_at_end:
        actor.reload()
        _export_hf(actor, config, os.path.join(out, "hf"))
    return out


# --- rollout ------------------------------------------------------------------------------------------------------


def _generate_batch(config, stream, engine, rewards, tokenizer, step, metrics) -> dict:
    """Rank 0: draw prompts, generate, score, shape, and (with dynamic sampling) refill until the batch is full."""
    n = config.rollout.n
    round_index = 0

    def generate_round():
        nonlocal round_index
        prompts = stream.next_batch(config.data.prompts_per_generation_round)
        outputs = engine.generate(
            [p.prompt_ids for p in prompts],
            n=n,
            seed=_round_seed(config.trainer.seed, step, round_index),
            max_new_tokens=config.data.max_response_length,
        )
        round_index += 1
        scores, info = _score(rewards, tokenizer, [(p, s) for p, group in zip(prompts, outputs) for s in group])
        for key in ("num_errors", "num_timeouts"):
            metrics[f"reward/{key}"] = metrics.get(f"reward/{key}", 0.0) + info[key]
        return [
            {"prompt": p, "samples": group, "scores": scores[g * n : (g + 1) * n]}
            for g, (p, group) in enumerate(zip(prompts, outputs))
        ]

    if config.dynamic_sampling.enable:
        groups, ds_metrics = fill_batch(
            generate_round,
            lambda group: group["scores"],
            config.data.train_batch_size,
            config.dynamic_sampling.max_num_gen_batches,
        )
        metrics.update({f"dynamic_sampling/{k}": float(v) for k, v in ds_metrics.items()})
    else:
        groups = []
        while len(groups) < config.data.train_batch_size:
            groups += generate_round()
        groups = groups[: config.data.train_batch_size]

    prompt_ids, response_ids, logprobs, scores, group_index = [], [], [], [], []
    finish_length = 0
    for g, group in enumerate(groups):
        for sample, score in zip(group["samples"], group["scores"]):
            prompt_ids.append(list(group["prompt"].prompt_ids))
            response_ids.append(list(sample.response_ids))
            logprobs.append(list(sample.logprobs))
            scores.append(float(score))
            group_index.append(g)
            finish_length += sample.finish_reason == "length"
    raw_scores = torch.tensor(scores)
    if config.data.enable_overlong_buffer:
        shaped = apply_overlong_penalty(
            raw_scores,
            torch.tensor([len(r) for r in response_ids]),
            max_response_length=config.data.max_response_length,
            overlong_buffer_len=config.data.overlong_buffer_len,
            overlong_penalty_factor=config.data.overlong_penalty_factor,
        )
    else:
        shaped = raw_scores
    metrics["reward/mean"] = float(raw_scores.mean())
    metrics["reward/shaped_mean"] = float(shaped.mean())
    metrics["response_length/clip_frac"] = finish_length / len(response_ids)
    samples = Samples(prompt_ids=prompt_ids, response_ids=response_ids)
    samples.rollout_log_probs = response_aligned(logprobs, samples.max_response_len)
    return {
        "samples": samples,
        "scores": shaped.tolist(),
        "group_index": group_index,
        "data_state": stream.state_dict(),
    }


def _score(rewards, tokenizer, responses: list) -> tuple[list[float], dict]:
    """Rewards of ``(prompt, sample)`` pairs, each response decoded without special tokens."""
    return rewards.compute_rewards(
        [RewardSample(tokenizer.decode(s.response_ids, skip_special_tokens=True), p.label, p.data_source, p.extra_info)
         for p, s in responses]
    )  # fmt: skip


def _due(freq: int, step: int, total_steps: int) -> bool:
    """Checkpoints and validation: every ``freq`` steps (0: never) and after the last step."""
    return step == total_steps or bool(freq and step % freq == 0)


def _validate(config, prompts, engine, rewards, tokenizer) -> dict[str, float]:
    """Rank 0: answer every validation prompt with ``rollout.val_kwargs`` sampling and score the answers."""
    val = config.rollout.val_kwargs
    sampling = engine.sampling_params(temperature=val.temperature, top_p=val.top_p, top_k=val.top_k)
    outputs = engine.generate([p.prompt_ids for p in prompts], n=val.n, seed=config.trainer.seed, sampling=sampling,
                              max_new_tokens=config.data.max_response_length)  # fmt: skip
    responses = [(p, s) for p, group in zip(prompts, outputs) for s in group]
    scores, _ = _score(rewards, tokenizer, responses)
    metrics = {
        "val/reward/mean": sum(scores) / len(scores),
        "val/response_length/mean": sum(len(s.response_ids) for _, s in responses) / len(responses),
    }
    sources = sorted({p.data_source for p, _ in responses})
    if len(sources) > 1:  # verl's per-data-source validation scores
        for source in sources:
            mine = [score for (p, _), score in zip(responses, scores) if p.data_source == source]
            metrics[f"val/reward/{source or 'unknown'}"] = sum(mine) / len(mine)
    return metrics


def _round_seed(seed: int, step: int, round_index: int) -> int:
    # Seeds are a function of the step, not of how far a process has come, so a resumed run samples the same.
    return (seed * 1_000_003 + step * 1_009 + round_index) % (2**31)


def _mini_batches(group_index: list[int], config: Config) -> list[list[int]]:
    """Sample indices per mini-batch: ppo_mini_batch_size whole groups each, in order."""
    per = config.actor.ppo_mini_batch_size
    groups = sorted(set(group_index))
    return [
        [i for i, g in enumerate(group_index) if g in set(groups[start : start + per])]
        for start in range(0, len(groups), per)
    ]


def _engine_memory(engine, config: Config, *, release: bool = False, tags: list[str] | None = None) -> None:
    """Colocated runs (``rollout.enable_memory_saver``): the engine frees its GPU memory for training and takes it
    back in two parts, weights first (for the sync), then its KV cache once the trainer has offloaded."""
    if engine is None or not config.rollout.enable_memory_saver:
        return
    if release:
        engine.release_memory()
    else:
        engine.resume_memory(tags)


def _launch_this_nodes_sglang(config: Config, out: str) -> list:
    """Multi-node SGLang: rank 0's engine starts node 0's servers; the first process of every other node starts
    that node's (rank 0 then waits until all of them serve)."""
    from megatron_sapo.rollout.sglang import launch_node

    node_rank, local_rank = int(os.environ.get("GROUP_RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if config.rollout.backend != "sglang" or config.rollout.num_nodes < 2 or node_rank == 0 or local_rank != 0:
        return []
    log_dir = os.path.join(out, "rollout_logs")
    os.makedirs(log_dir, exist_ok=True)
    return launch_node(config.rollout, config.model.path, node_rank, log_dir)


def _broadcast(obj):
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --- weights, checkpoints -----------------------------------------------------------------------------------------


def _sync_weights(actor: MegatronActor, engine, config: Config) -> None:
    """Collective: the rollout engine gets the actor's weights (rank 0 talks to it)."""
    named_tensors = actor.export_hf_weights()
    if is_rank0():
        engine.update_weights(named_tensors)
    else:
        for _ in named_tensors:
            pass


def _save(actor: MegatronActor, stream: PromptStream, step: int, checkpoints: str, config: Config) -> None:
    ckpt = step_dir(checkpoints, step)
    state = {"step": step, "data": stream.state_dict()}
    save_sharded(actor.sharded_state_dict(), ckpt, extra_files={TRAINER_STATE_FILE: json.dumps(state)},
                 timeout_s=config.trainer.save_timeout_s)  # fmt: skip
    if is_rank0():
        publish_latest(checkpoints, ckpt, config.trainer.max_checkpoints_to_keep)
    dist.barrier()


def _resume_checkpoint(config: Config, checkpoints: str) -> str | None:
    if config.trainer.resume == "disable":
        return None
    if config.trainer.resume == "auto":
        return latest_checkpoint(checkpoints)
    return config.trainer.resume


def _export_hf(actor: MegatronActor, config: Config, hf_dir: str) -> None:
    from megatron_sapo.convert.hf_io import write_hf_checkpoint

    named_tensors = actor.export_hf_weights()
    if is_rank0():
        tmp = hf_dir + ".tmp"
        write_hf_checkpoint(named_tensors, tmp, template_dir=config.model.path)
        replace_dir(tmp, hf_dir)
        logger.info("final policy exported to %s", hf_dir)
    else:
        for _ in named_tensors:
            pass
    dist.barrier()


@contextmanager
def _timer(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
