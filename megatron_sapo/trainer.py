"""The SAPO trainer, top to bottom.

Each step: prompts → rollout (``rollout.n`` samples each) → rewards (+ DAPO overlong shaping, dynamic sampling) →
old log-probs from the current Megatron policy (and reference log-probs when the KL term is on) → advantages →
one optimizer step per mini-batch (micro-batches through Megatron's pipeline schedule, loss on vocab-parallel
logits) → a checkpoint every ``trainer.save_freq`` steps → weight sync to the rollout engine → metrics. With
``algorithm.adv_estimator=gae`` a Megatron critic (``critic.py``) gives the values after the old log-probs, GAE
the advantages and returns, and the critic updates before the policy (which waits ``trainer.critic_warmup`` steps).

Generation, reward scoring and logging happen on global rank 0; the sampled batch is broadcast, and everything
Megatron does is collective. With ``actor.megatron.*_offload`` the trainer's GPU state moves to host memory while
the rollout engine generates. With ``trainer.rollout_mode=one_step_off`` a thread on rank 0 generates step t+1's
batch while step t trains (on servers with devices of their own); the sync after step t waits for it.
"""

from __future__ import annotations

import base64
import datetime
import functools
import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_sapo.actor import MegatronActor
from megatron_sapo.batch import Samples, response_aligned
from megatron_sapo.checkpoint import (
    CRITIC_DIR,
    METADATA_FILE,
    TRAINER_STATE_FILE,
    checkpoint_bytes,
    latest_step,
    publish_latest,
    remove_partial_saves,
    resume_candidates,
    save_sharded,
    step_dir,
    verified_problem,
)
from megatron_sapo.config import Config, resolve_total_steps, save_resolved_config
from megatron_sapo.critic import MegatronCritic
from megatron_sapo.data import PromptStream
from megatron_sapo.data.prompts import RunData, load_run_data
from megatron_sapo.errors import InputError, RunError
from megatron_sapo.loss import (
    apply_overlong_penalty,
    compute_advantages,
    explained_variance,
    gae_advantages,
    masked_mean,
    rollout_correction,
)
from megatron_sapo.metrics import MetricsLogger
from megatron_sapo.models import ModelArch, load_arch
from megatron_sapo.models.routing_replay import decode_routed_experts, routing_dtype
from megatron_sapo.parallel.mcore_compat import unreadable_checkpoint
from megatron_sapo.parallel.state import initialize_model_parallel, is_rank0
from megatron_sapo.rewards import RewardManager, RewardSample
from megatron_sapo.rewards.dynamic_sampling import fill_batch
from megatron_sapo.rollout.auth import run_api_key
from megatron_sapo.rollout.engine import RolloutEngine

logger = logging.getLogger("megatron_sapo")


def train(config: Config, data: RunData | None = None) -> str:
    """Run training; returns the output folder. Collective over torchrun's processes.

    ``data``: the tokenizer and prompt sets when the caller has loaded (and so checked) them already."""
    arch = load_arch(config.model.path)
    if config.actor.router_replay.mode == "R3":  # R3 replays the engine's routing: it must send it
        config.rollout.enable_return_routed_experts = True
    initialize_model_parallel(config.actor.megatron.layout, seed=config.actor.megatron.seed, arch=arch)
    out = config.trainer.output_dir
    checkpoints = os.path.join(out, "checkpoints")
    tokenizer, train_prompts, val_prompts = data or load_run_data(config)
    config.trainer.total_steps = resolve_total_steps(config.trainer, config.data, len(train_prompts))
    if is_rank0():
        save_resolved_config(config, out)
    stream = PromptStream(train_prompts, shuffle=config.data.shuffle, seed=config.data.seed)
    resume_from = _resume_checkpoint(config, checkpoints)  # before the heavy work: a bad one is one line
    actor = MegatronActor(config, arch)
    critic = MegatronCritic(config, arch) if config.use_critic else None  # algorithm.adv_estimator=gae
    trained = [actor] + ([critic] if critic is not None else [])

    start_step = 0
    overlap = config.trainer.rollout_mode == "one_step_off"
    in_flight = None  # one_step_off: the next step's batch, once it is generated (on every rank)
    if resume_from:
        actor.load_checkpoint(resume_from)
        if critic is not None:
            critic.load_checkpoint(os.path.join(resume_from, CRITIC_DIR))
        with open(os.path.join(resume_from, TRAINER_STATE_FILE)) as f:
            state = json.load(f)
        start_step = state["step"]
        stream.load_state_dict(state["data"])
        if state.get(IN_FLIGHT_KEY):  # saved by one_step_off (its prompts are drawn): trained on in either mode
            in_flight = _decode_batch(state[IN_FLIGHT_KEY])
    else:
        for model in trained:
            model.load_initial_weights()

    # The rollout engine starts on a GPU the trainer has cleared (colocated runs offload it).
    _offload(trained)
    api_key = _rollout_api_key(config)
    node_servers = _launch_this_nodes_sglang(config, out, api_key)
    engine = rewards = metrics_log = None
    if is_rank0():
        engine = RolloutEngine(config.rollout, model_path=config.model.path, eos_token_id=tokenizer.eos_token_id,
                               log_dir=os.path.join(out, "rollout_logs"), api_key=api_key)  # fmt: skip
        rewards = RewardManager(config.reward)
        metrics_log = MetricsLogger(out, resume_step=start_step, tensorboard=config.trainer.tensorboard,
                                    wandb_project=config.trainer.wandb_project)  # fmt: skip
    if resume_from:  # the engine loaded model.path; it needs the resumed policy
        actor.reload()
        _everyone_or_fail(functools.partial(_sync_weights, actor, engine, config,
                                            version=_policy_version(config, start_step)), engine)  # fmt: skip
        actor.offload()
    ahead = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if overlap and is_rank0() else None
    pending = None  # one_step_off, rank 0: the Future of the next step's batch
    if val_prompts and config.trainer.val_before_train and start_step == 0:
        val_metrics = _from_rank0_or_fail(functools.partial(_validate, config, val_prompts, engine, rewards, tokenizer))
        if is_rank0():
            metrics_log.log(0, val_metrics)

    progress = tqdm(range(start_step + 1, config.trainer.total_steps + 1), desc="steps", disable=not is_rank0(),
                    initial=start_step, total=config.trainer.total_steps)  # fmt: skip
    try:
        for step in progress:
            timings: dict[str, float] = {}
            metrics: dict[str, float] = {}

            # 1. Rollout and rewards (rank 0; the trainer's GPU state sits on the host meanwhile). one_step_off: the
            # batch was generated during the previous step (the first step's, and a resumed sync run's, is made now).
            with _timer(timings, "rollout"):
                if in_flight is None:
                    batch = _from_rank0_or_fail(functools.partial(
                        _generate_batch, config, arch, stream, engine, rewards, tokenizer, step, metrics))  # fmt: skip
                else:
                    batch, in_flight = in_flight, None
                    metrics.update(batch.pop("metrics"))
            _engine_memory(engine, config, release=True)
            _reload(trained)
            stream.load_state_dict(batch["data_state"])  # every rank follows rank 0's draws
            samples = batch["samples"]
            metrics.update(_staleness(batch["weight_versions"], trainer_version=_policy_version(config, step - 1)))
            if ahead is not None and step < config.trainer.total_steps:  # step + 1's batch, on the current weights
                pending = ahead.submit(_generate_ahead, config, arch, stream, engine, rewards, tokenizer, step + 1)

            # 2. Log-probs of the sampled tokens under the current policy (and the frozen reference).
            with _timer(timings, "old_log_probs"):
                if config.actor.router_replay.mode == "R3":
                    samples.replay_routing = _engine_routing_or_fail(samples)
                if config.algorithm.rollout_correction.bypass_mode:  # the engine's log-probs are the old policy
                    samples.old_log_probs = samples.rollout_log_probs.clone()
                else:
                    samples.old_log_probs = actor.compute_log_probs(samples)
                if config.actor.router_replay.mode == "R2":  # the updates replay the routing just used
                    samples.replay_routing = samples.trainer_routing
                if config.actor.use_kl_loss:
                    samples.ref_log_probs = actor.compute_log_probs(samples, reference=True)
            if critic is not None:  # the critic's values of the states before each response token
                with _timer(timings, "values"):
                    samples.values = critic.compute_values(samples).cpu()
            mask = samples.response_mask()
            metrics.update(_rollout_correction(config, samples, mask))
            if "router_agreement" in samples.extra:
                metrics["rollout/router_agreement"] = samples.extra["router_agreement"]

            # 3. Advantages from the (shaped) rewards: per group of rollout.n samples, or GAE's from the values
            # (with the returns, the critic's targets).
            scores = torch.tensor(batch["scores"])
            if critic is not None:
                samples.advantages, samples.returns = gae_advantages(
                    scores, samples.values, mask.bool(), gamma=config.algorithm.gamma, lam=config.algorithm.lam
                )
            else:
                samples.advantages = compute_advantages(
                    config.algorithm.adv_estimator,
                    rewards=scores,
                    response_mask=mask,
                    group_index=torch.tensor(batch["group_index"]),
                    gamma=config.algorithm.gamma,
                    lam=config.algorithm.lam,
                    norm_by_std=config.algorithm.norm_adv_by_std_in_grpo,
                )

            # 4. The critic's update (every step), then the policy's (from step trainer.critic_warmup on): one
            # optimizer step per mini-batch of ppo_mini_batch_size prompts each.
            if critic is not None:
                with _timer(timings, "update_critic"):
                    critic_metrics = critic.update(
                        samples, _mini_batches(batch["group_index"], config.critic.ppo_mini_batch_size)
                    )
                metrics.update({f"critic/{k}": v for k, v in critic_metrics.items()})
                metrics["critic/explained_variance"] = explained_variance(samples.values, samples.returns, mask)
            update_metrics = {}
            actor_updates = _actor_updates(config, step)
            if actor_updates:
                with _timer(timings, "update"):
                    update_metrics = actor.update(
                        samples, _mini_batches(batch["group_index"], config.actor.ppo_mini_batch_size)
                    )

            # 4b. one_step_off: the next step's batch finishes on the weights it started with (the sync waits for it:
            # a batch never mixes weight versions) and goes to every rank, and into a checkpoint taken now.
            if overlap and step < config.trainer.total_steps:
                with _timer(timings, "rollout"):
                    in_flight = _from_rank0_or_fail(pending.result if pending is not None else None)  # rank 0's
                    pending = None

            # 5. A checkpoint, while the trainer's state is on the GPU (before it is offloaded for the next rollout).
            if _due(config.trainer.save_freq, step, config.trainer.total_steps):
                _save(
                    trained,
                    stream,
                    step,
                    checkpoints,
                    config,
                    extra_state={IN_FLIGHT_KEY: _encode_batch(in_flight)} if in_flight is not None else None,
                )

            # 6. The rollout engine gets the new weights (version = step); then it has the GPU again. During the
            # critic's warm-up the policy has not changed and the engine keeps the weights it has.
            with _timer(timings, "weight_sync"):
                _engine_memory(engine, config, tags=["weights"])
                if actor_updates:
                    _everyone_or_fail(functools.partial(_sync_weights, actor, engine, config, version=step), engine)
                _offload(trained)
                _engine_memory(engine, config, tags=["kv_cache", "cuda_graph"])

            # 7. Metrics, and validation on data.val_files with the new weights.
            metrics.update({f"actor/{k}": v for k, v in update_metrics.items()})
            metrics["rollout/logprob_diff"] = float(
                masked_mean((samples.old_log_probs.cpu() - samples.rollout_log_probs).abs(), mask)
            )
            metrics["response_length/mean"] = float(mask.sum(-1).mean())
            num_tokens = sum(samples.lengths())
            metrics.update({f"timing/{k}": v for k, v in timings.items()})
            metrics["perf/tokens_per_s"] = num_tokens / max(sum(timings.values()), 1e-9)
            if val_prompts and _due(config.trainer.test_freq, step, config.trainer.total_steps):
                validate = functools.partial(_validate, config, val_prompts, engine, rewards, tokenizer)
                with _timer(timings, "validation"):
                    metrics.update(_from_rank0_or_fail(validate))
                metrics["timing/validation"] = timings["validation"]
            if is_rank0():
                metrics_log.log(step, metrics)
                progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
    finally:
        if ahead is not None:  # a failed step leaves the batch in flight: let it end before the engine does
            ahead.shutdown(wait=True, cancel_futures=True)
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


def _generate_batch(config, arch, stream, engine, rewards, tokenizer, step, metrics) -> dict:
    """Rank 0: draw prompts, generate, score, shape, and (with dynamic sampling) refill until the batch is full."""
    n = config.rollout.n
    round_index = 0

    def generate_round():
        nonlocal round_index
        wanted = config.data.prompts_per_generation_round
        drawn = math.ceil(config.rollout.over_sample_factor * wanted)
        prompts = stream.next_batch(drawn)
        prompt_ids = [p.prompt_ids for p in prompts]
        seed = _round_seed(config.trainer.seed, step, round_index)
        if drawn > wanted:  # over-sampling: the first `wanted` groups to complete, the rest aborted
            kept, outputs = engine.generate_first(
                prompt_ids, wanted, n=n, seed=seed, max_new_tokens=config.data.max_response_length
            )
            prompts = [prompts[i] for i in kept]
            metrics["rollout/aborted_groups"] = metrics.get("rollout/aborted_groups", 0.0) + drawn - len(kept)
        else:
            outputs = engine.generate(prompt_ids, n=n, seed=seed, max_new_tokens=config.data.max_response_length)
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
    samples.routed_experts = _decode_engine_routing(config, arch, [s for group in groups for s in group["samples"]])
    return {
        "samples": samples,
        "scores": shaped.tolist(),
        "group_index": group_index,
        "data_state": stream.state_dict(),
        "weight_versions": [s.weight_version for group in groups for s in group["samples"]],
    }


def _generate_ahead(config, arch, stream, engine, rewards, tokenizer, step) -> dict:
    """one_step_off, on rank 0's rollout thread: step ``step``'s batch, its rollout metrics inside. The main thread
    touches neither the engine nor the stream nor the reward workers until it has the result."""
    metrics: dict[str, float] = {}
    batch = _generate_batch(config, arch, stream, engine, rewards, tokenizer, step, metrics)
    return {**batch, "metrics": metrics}


def _staleness(weight_versions: list, trainer_version: int) -> dict[str, float]:
    """How many updates each sample's weights are behind the policy that trains on it. Versions are the trainer's
    step counts that it pushes with every sync; a server still on model.path answers SGLang's "default" (= 0)."""
    lags = [trainer_version - (int(v) if str(v).isdigit() else 0) for v in weight_versions]
    return {"rollout/staleness_mean": sum(lags) / len(lags), "rollout/staleness_max": float(max(lags))}


# one_step_off: the batch generated during the checkpointed step (on weights the checkpoint no longer holds, so it
# cannot be regenerated on resume; it is saved instead: MBs, ~1 GiB with R3's routing at the 30B recipe's batch,
# next to the model's and optimizer's hundreds of GBs).
IN_FLIGHT_KEY = "in_flight_batch"


def _encode_batch(batch: dict) -> str:
    buffer = io.BytesIO()
    torch.save(batch, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_batch(text: str) -> dict:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=False)  # the run's own checkpoint


def _decode_engine_routing(config: Config, arch: ModelArch, outputs: list) -> list[torch.Tensor] | None:
    """The engine's ``meta_info.routed_experts`` of every sample (compact integer tensors), or None when it sent
    none (SGLang without --enable-return-routed-experts, or a dense model)."""
    encoded = [sample.meta_info.get("routed_experts") for sample in outputs]
    if not config.rollout.enable_return_routed_experts or any(e is None for e in encoded):
        return None
    dtype = routing_dtype(arch.num_experts)
    return [decode_routed_experts(e, arch.num_layers, arch.num_experts_per_tok).to(dtype) for e in encoded]


def _engine_routing_or_fail(samples: Samples) -> list[torch.Tensor]:
    if samples.routed_experts is None:
        raise RunError("actor.router_replay.mode=R3: the rollout engine returned no meta_info.routed_experts; "
                       "an external SGLang server must run with --enable-return-routed-experts")  # fmt: skip
    for prompt, response, routing in zip(samples.prompt_ids, samples.response_ids, samples.routed_experts):
        if routing.shape[0] != len(prompt) + len(response) - 1:
            raise RunError(f"actor.router_replay.mode=R3: the engine's routing covers {routing.shape[0]} "
                           f"positions of a {len(prompt) + len(response)}-token sample, not seq_len - 1; "
                           "routed_experts_start_len must be 0")  # fmt: skip
    return samples.routed_experts


def _rollout_correction(config: Config, samples: Samples, mask: torch.Tensor) -> dict[str, float]:
    """algorithm.rollout_correction on the whole step's batch (every rank computes the same): the IS weights and
    the rejection mask go into ``samples`` for the loss; returns the ``rollout_corr/`` metrics."""
    rc = config.algorithm.rollout_correction
    correction = rollout_correction(
        samples.old_log_probs.cpu(), samples.rollout_log_probs, mask,
        rollout_is=rc.rollout_is, rollout_is_threshold=rc.rollout_is_threshold,
        rollout_is_threshold_lower=rc.rollout_is_threshold_lower, rollout_rs=rc.rollout_rs,
        rollout_rs_threshold=rc.rollout_rs_threshold, rollout_rs_threshold_lower=rc.rollout_rs_threshold_lower,
    )  # fmt: skip
    samples.rollout_is_weights = correction.weights if rc.rollout_is else None
    samples.loss_mask = correction.loss_mask if rc.rollout_rs else None
    return {f"rollout_corr/{name}": float(value) for name, value in correction.metrics.items()}


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
    sampling = engine.sampling_params(temperature=val.temperature, top_p=val.top_p, top_k=val.top_k,
                                      return_routed_experts=False)  # validation replays nothing  # fmt: skip
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
    # Seeds are a function of the step, not of how far a process has come, so a resumed run samples the same: on the
    # embedded server always, on SGLang only with rollout.deterministic_inference (it ignores seeds otherwise).
    return (seed * 1_000_003 + step * 1_009 + round_index) % (2**31)


def _mini_batches(group_index: list[int], per: int) -> list[list[int]]:
    """Sample indices per mini-batch: ``per`` (a ppo_mini_batch_size) whole groups each, in order."""
    groups = sorted(set(group_index))
    return [
        [i for i, g in enumerate(group_index) if g in set(groups[start : start + per])]
        for start in range(0, len(groups), per)
    ]


def _engine_memory(engine, config: Config, *, release: bool = False, tags: list[str] | None = None) -> None:
    """Colocated runs (``rollout.enable_memory_saver``): the engine frees all its GPU memory (``kv_cache``,
    ``weights``, ``cuda_graph``) for training and takes it back in two parts, as slime does: the weights first (for
    the sync), then the KV cache and the CUDA graphs, which replay on that memory, once the trainer has offloaded."""
    if engine is None or not config.rollout.enable_memory_saver:
        return
    if release:
        engine.release_memory()
    else:
        engine.resume_memory(tags)


def _multi_node_sglang(config: Config) -> bool:
    return config.rollout.backend == "sglang" and config.rollout.num_nodes > 1


def _rollout_api_key(config: Config) -> str | None:
    """Collective: the rollout servers' API key (rollout/auth.py), made on rank 0; the first process of every node
    gets it too when SGLang servers span nodes (each node launches its own). None: the engine makes its own."""
    if not _multi_node_sglang(config):
        return None
    return _broadcast(run_api_key(config.rollout.api_key, launched=True) if is_rank0() else None)


def _launch_this_nodes_sglang(config: Config, out: str, api_key: str | None) -> list:
    """Multi-node SGLang: rank 0's engine starts node 0's servers; the first process of every other node starts
    that node's (rank 0 then waits until all of them serve)."""
    from megatron_sapo.rollout.sglang import launch_node

    node_rank, local_rank = int(os.environ.get("GROUP_RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not _multi_node_sglang(config) or node_rank == 0 or local_rank != 0:
        return []
    log_dir = os.path.join(out, "rollout_logs")
    os.makedirs(log_dir, exist_ok=True)
    return launch_node(config.rollout, config.model.path, node_rank, log_dir, api_key=api_key)


# Ranks 1..N-1 wait here for the whole rollout; on gloo they wait on the CPU instead of inside an NCCL kernel
# next to the rollout engine, and under this timeout instead of the NCCL watchdog's.
HANDOVER_TIMEOUT = datetime.timedelta(hours=6)


@functools.cache
def _handover_group():
    return dist.new_group(backend="gloo", timeout=HANDOVER_TIMEOUT)


def _broadcast(obj):
    """Rank 0's batch to every rank (collective: every rank creates the gloo group at its first call)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=_handover_group())
    return holder[0]


# --- weights, checkpoints -----------------------------------------------------------------------------------------


def _sync_weights(actor: MegatronActor, engine, config: Config, *, version: int) -> None:
    """Collective: the rollout engine gets the actor's weights (rank 0 talks to it), tagged ``version`` (the step
    that produced them; samples carry it back as ``meta_info.weight_version``). Colocated (weight sync ``tensor``)
    every rank gets every full tensor and hands the server rank on its device a handle to it."""
    from megatron_sapo.convert.megatron_io import export_hf_weights
    from megatron_sapo.rollout.weight_sync import push_colocated

    mode = _broadcast(engine.weight_sync_mode if is_rank0() else None)
    if mode == "tensor":
        named_tensors = export_hf_weights(actor.model, actor.arch, all_ranks=True)
        if is_rank0():
            engine.update_weights(named_tensors, weight_version=str(version))
        else:
            push_colocated(named_tensors, config.rollout.bucket_bytes)
        return
    named_tensors = actor.export_hf_weights()
    if is_rank0():
        engine.update_weights(named_tensors, weight_version=str(version))
    else:
        for _ in named_tensors:
            pass


def _from_rank0_or_fail(produce):
    """Collective: ``produce()`` on rank 0, its result on every rank. When it fails for an outside reason (a dead
    rollout server), every rank raises the same one-line RunError instead of the others waiting forever."""
    result = None
    if is_rank0():
        try:
            result = produce()
        except Exception as error:
            result = _outside_failure(error)
            if result is None:
                raise
    result = _broadcast(result)
    if isinstance(result, _Failure):
        raise RunError(result.message)
    return result


def _everyone_or_fail(run, engine) -> None:
    """Collective: ``run()`` on every rank (rank 0 talks to the rollout servers); a failure on rank 0 for an outside
    reason becomes the same one-line RunError on every rank."""
    failure = None
    try:
        run()
    except Exception as error:
        failure = _outside_failure(error, engine) if is_rank0() else None
        if failure is None:
            raise
    failure = _broadcast(failure)
    if failure is not None:
        raise RunError(failure.message)


def _outside_failure(error: Exception, engine=None) -> _Failure | None:
    """A rank-0 failure that is not a bug: a rollout server gone (whatever error its absence caused, e.g. in a
    weight-sync collective), a RolloutError, a RunError. None for anything else (a traceback is then right)."""
    from megatron_sapo.rollout.client import RolloutError

    gone = engine.exit_reason() if engine is not None else None
    if gone:
        return _Failure(gone)
    if isinstance(error, (RolloutError, RunError)):
        return _Failure(str(error))
    return None


class _Failure:
    def __init__(self, message: str):
        self.message = " ".join(message.split())  # one line


def _actor_updates(config: Config, step: int) -> bool:
    """verl's critic warm-up (``critic_warmup <= global_steps``, steps counted from 1): the policy trains from step
    ``trainer.critic_warmup`` on; without a critic, always."""
    return not config.use_critic or step >= config.trainer.critic_warmup


def _policy_version(config: Config, step: int) -> int:
    """The step whose update produced the policy after ``step`` (0: the initial one); the weight version the
    engine holds. Warm-up steps leave the policy as it was."""
    return step if _actor_updates(config, step) else 0


def _offload(trained: list) -> None:
    for model in trained:
        model.offload()


def _reload(trained: list) -> None:
    for model in trained:
        model.reload()


def _save(trained: list, stream: PromptStream, step: int, checkpoints: str, config: Config,
          extra_state: dict | None = None) -> None:  # fmt: skip
    """The actor's state (with the RNG states and the trainer's) and, with GAE, the critic's in ``critic/``."""
    actor, *critic = trained
    ckpt = step_dir(checkpoints, step)
    state = {"step": step, "data": stream.state_dict(), **(extra_state or {})}
    previous = latest_step(checkpoints)  # the same structure: its size is what this one needs
    save_sharded(actor.sharded_state_dict(), ckpt, extra_files={TRAINER_STATE_FILE: json.dumps(state)},
                 parts={CRITIC_DIR: critic[0].sharded_state_dict()} if critic else None,
                 timeout_s=config.trainer.save_timeout_s,
                 expected_bytes=checkpoint_bytes(step_dir(checkpoints, previous)) if previous else None)  # fmt: skip
    if is_rank0():
        publish_latest(checkpoints, ckpt, config.trainer.max_checkpoints_to_keep)
    dist.barrier()


def _resume_checkpoint(config: Config, checkpoints: str) -> str | None:
    """Collective: the checkpoint to resume from, verified against its manifest (sizes and checksums, each rank
    its share of the files), the same choice on every rank.

    ``trainer.resume=auto`` passes over a damaged newest checkpoint to the newest complete one, with one warning
    line; a named checkpoint that fails the check is one error line. With GAE the checkpoint must hold the critic
    (one from a run without it does not count)."""
    resume = config.trainer.resume
    if resume == "disable":
        return None
    required = (TRAINER_STATE_FILE,) + ((f"{CRITIC_DIR}/{METADATA_FILE}",) if config.use_critic else ())
    choice: tuple[str | None, str | None] = (None, None)  # (checkpoint, error)
    if is_rank0():
        remove_partial_saves(checkpoints)
    dist.barrier()
    if resume == "auto":
        try:
            path, skipped = resume_candidates(checkpoints, required)
        except InputError as error:  # a checkpoint of another megatron-core: not passed over (see there)
            path, skipped, choice = None, [], (None, str(error))
        if path and skipped and is_rank0():
            logger.warning("trainer.resume=auto: passed over %s; resuming from %s", "; ".join(skipped), path)
        if choice[1] is None:
            choice = (path, None) if path or not skipped else (
                None, f"trainer.resume=auto: no complete checkpoint in {checkpoints} ({'; '.join(skipped)}); set "
                      "trainer.resume=disable to start over or name a checkpoint")  # fmt: skip
    else:
        problem = verified_problem(resume, required=required) or unreadable_checkpoint(resume)
        choice = (None, f"trainer.resume={resume}: the checkpoint {problem}; name a complete one (or use auto)") \
            if problem else (resume, None)  # fmt: skip
    path, error = _broadcast(choice)  # rank 0's word, should a rank have seen the folders otherwise
    if error:
        raise InputError(error)
    return path


def _export_hf(actor: MegatronActor, config: Config, hf_dir: str) -> None:
    """Rank 0 streams the gathered tensors into HF safetensors shards (5 GB, with an index) in the dtype of the
    model's config.json, written atomically; it holds at most one shard file's worth of host memory."""
    from megatron_sapo.convert.hf_io import config_dtype, write_hf_checkpoint

    named_tensors = actor.export_hf_weights()
    if is_rank0():
        start = time.perf_counter()
        dtype = config_dtype(config.model.path)
        tensors, nbytes = write_hf_checkpoint(named_tensors, hf_dir, template_dir=config.model.path, dtype=dtype)
        logger.info("final policy exported to %s: %d tensors, %.3f GB in %.1f s",
                    hf_dir, tensors, nbytes / 1e9, time.perf_counter() - start)  # fmt: skip
    else:
        for _ in named_tensors:
            pass
    dist.barrier()


# On GPU: this process's peak allocated bytes per phase over the run (bench/gpu_smoke.py prints them).
PHASE_PEAK_BYTES: dict[str, int] = {}


@contextmanager
def _timer(timings: dict[str, float], name: str):
    """Wall time of a phase; on GPU the kernels it queued are waited for, so the time is the phase's own."""
    _synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    _synchronize()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    if torch.cuda.is_available():
        PHASE_PEAK_BYTES[name] = max(PHASE_PEAK_BYTES.get(name, 0), torch.cuda.max_memory_allocated())


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
