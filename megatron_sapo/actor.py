"""The policy on Megatron-Core: model chunks, DDP, the distributed optimizer, log-probs and the policy update.

Everything here is collective: every rank calls the same methods with the same ``Samples`` (the whole step's
batch); each rank takes its data-parallel share, and Megatron's pipeline schedule runs the micro-batches.
Per-token results (log-probs) come back on every rank for the samples of its data-parallel share.
"""

from __future__ import annotations

import gc
from functools import partial

import torch
import torch.distributed as dist

from megatron_sapo.batch import (
    MicroBatch,
    Samples,
    bucket_by_length,
    data_parallel_shard,
    make_micro_batch,
    split_to_count,
)
from megatron_sapo.config import Config
from megatron_sapo.convert.megatron_io import export_hf_weights, load_hf_weights, unwrap_model
from megatron_sapo.loss import loss_denominator, policy_loss, vocab_parallel_log_probs
from megatron_sapo.models.qwen3_moe import ModelOptions, Qwen3MoeArch, build_model, transformer_engine_usable
from megatron_sapo.models.routing_replay import RoutingReplay
from megatron_sapo.parallel import offload
from megatron_sapo.parallel.cpu_device import device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Each rank writes its own optimizer shard, in parallel and without gathering (megatron-core 0.16's torch_dist
# backend no longer takes the flattened model-space format). The price: a resume must keep TP/PP/EP; DP may change.
OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
# How policy_loss's micro-batch metrics combine over micro-batches and DP ranks (see _reduce_metrics).
SUMMED_METRICS = ("pg_loss", "kl_loss", "entropy")
TOKEN_MEAN_METRICS = ("ratio_mean", "grad_weight_mean", "grad_weight_low_frac", "approx_kl", "tis_weight_mean",
                      "tis_capped_frac")  # fmt: skip


def rng_sharded_object():
    """This rank's RNG states (torch CPU, CUDA, Megatron's tracker) as a ShardedObject that survives a DP change.

    Megatron's RNG streams depend on a rank's model-parallel position (PP, TP, EP, expert-TP rank), not on its
    data-parallel rank, so the object is keyed by that position and the data-parallel copies are replicas: a resume
    with the same layout gets every rank's own state back, one with another DP size (which the ``dp_reshardable``
    optimizer format allows) gets the state of its model-parallel position. Collective (the replica numbering)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    position = (
        (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
        (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
    )
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, position)
    replica = everyone[: dist.get_rank()].count(position)
    # One shard per distinct position: TP and EP ranks can move together (TP=2 with EP=2 on 2 ranks), so the full
    # PP×TP×EP×ETP grid would have shards nobody writes, and dist_checkpointing refuses an incomplete grid.
    positions = sorted(set(everyone))
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state_by_model_parallel_rank", state, (len(positions),),
                         (positions.index(position),), replica_id=replica)  # fmt: skip


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_config(config: Config):
    """Megatron's ``OptimizerConfig`` for ``actor.optim`` and ``actor.megatron.optimizer_cpu_offload``.

    The hybrid CPU optimizer runs through the precision-aware path: the fp32 main params live with the optimizer
    (on the host for the offloaded fraction) instead of beside the model on the GPU, and it keeps them whole
    (``store_param_remainders`` is TE FusedAdam's). megatron-core 0.16's ``OptimizerConfig.__post_init__`` asks
    Transformer Engine's version on that path only to decide ``store_param_remainders`` and fails when TE is not
    installed (``is_te_min_version``); without TE the three fields are set here as it would set them."""
    from megatron.core.optimizer import OptimizerConfig

    optim, megatron = config.actor.optim, config.actor.megatron
    dtype = DTYPES[config.model.dtype]
    hybrid = megatron.optimizer_cpu_offload
    te = transformer_engine_usable()
    result = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=True,
        optimizer_cpu_offload=hybrid,
        optimizer_offload_fraction=megatron.optimizer_offload_fraction,
        use_precision_aware_optimizer=hybrid and te,
        store_param_remainders=False,
    )
    if hybrid and not te:
        result.use_precision_aware_optimizer = True
        result.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True
    return result


class MegatronActor:
    def __init__(self, config: Config, arch: Qwen3MoeArch):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.config, self.arch = config, arch
        megatron = config.actor.megatron
        self.layout = megatron.layout
        dtype = DTYPES[config.model.dtype]
        te = megatron.use_transformer_engine
        te = transformer_engine_usable() if te is None else te
        self.model_options = ModelOptions(
            params_dtype=dtype,
            moe_aux_loss_coeff=megatron.moe_aux_loss_coeff,
            moe_token_dispatcher_type=megatron.moe_token_dispatcher_type,
            moe_grouped_gemm=megatron.moe_grouped_gemm,
            recompute_granularity=megatron.recompute_granularity,
            recompute_num_layers=megatron.recompute_num_layers,
            use_transformer_engine=megatron.use_transformer_engine,
            fused_kernels=torch.cuda.is_available() and te,
            # Replay needs it; with replay off the routers only record, for rollout/router_agreement.
            moe_enable_routing_replay=any(arch.moe_layer_pattern),
        )
        chunks = build_model(arch, self.layout, self.model_options)
        self.routing_replay = RoutingReplay(chunks) if any(arch.moe_layer_pattern) else None
        model_config = chunks[0].config
        model_config.finalize_model_grads_func = finalize_model_grads
        # On GPU the gradient reduce-scatter overlaps the backward pass and the parameter all-gather the next
        # forward pass (Megatron-LM's --overlap-grad-reduce/--overlap-param-gather); neither needs TE.
        overlap = torch.cuda.is_available()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=True,
            overlap_grad_reduce=overlap,
            overlap_param_gather=overlap,
        )
        self.model = [DistributedDataParallel(model_config, ddp_config, chunk) for chunk in chunks]
        if overlap:
            # Megatron's schedules hold the grad reduce back until the last micro-batch through no_sync_func.
            model_config.no_sync_func = self.model[0].no_sync
        self.optimizer = get_megatron_optimizer(optimizer_config(config), self.model)
        if megatron.optimizer_cpu_offload:
            # megatron-core builds the hybrid optimizer twice: from the model's params in get_megatron_optimizer,
            # then from their shards in DistributedOptimizer. The first, with fp32 host copies of all of this
            # rank's params, is held only by reference cycles (its step hooks): free it now, not at some later
            # garbage collection.
            gc.collect()
        self._optimizer_host_copies = None  # offload.HostCopies, allocated at the first offload
        optim = config.actor.optim
        steps = config.trainer.total_steps * self.optimizer_steps_per_training_step
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.lr_warmup_steps,
            lr_decay_steps=max(steps, optim.lr_warmup_steps + 1),
            lr_decay_style=optim.lr_decay_style,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=max(steps, 1),
            wd_incr_style="constant",
        )
        # The KL reference is the initial policy, frozen: its own chunks, no DDP, no optimizer.
        self.reference = None
        if config.actor.use_kl_loss:
            self.reference = build_model(arch, self.layout, self.model_options)
            for chunk in self.reference:
                # DDP moves the policy's parameters into its device buffers; nothing moves the reference's, and
                # our RMSNorm (the spec without TE) creates its weight on the CPU.
                chunk.to(device()).requires_grad_(False)

    # --- set-up -------------------------------------------------------------------------------------------------

    @property
    def optimizer_steps_per_training_step(self) -> int:
        return self.config.data.train_batch_size // self.config.actor.ppo_mini_batch_size * self.config.actor.ppo_epochs

    def load_initial_weights(self) -> None:
        """The initial policy (and the KL reference) from ``model.mcore_checkpoint`` or the HF ``model.path``."""
        from megatron_sapo.checkpoint import load_sharded
        from megatron_sapo.convert.hf_io import HFCheckpointReader

        targets = [self.model] + ([self.reference] if self.reference is not None else [])
        for chunks in targets:
            if self.config.model.mcore_checkpoint:
                sharded = {"model": unwrap_model(chunks[0]).sharded_state_dict()}
                state = load_sharded(sharded, self.config.model.mcore_checkpoint, field="model.mcore_checkpoint")
                unwrap_model(chunks[0]).load_state_dict(state["model"])
            else:
                reader = HFCheckpointReader(self.config.model.path)
                reader.validate(self.arch)
                load_hf_weights(chunks, reader, self.arch)
        # The optimizer took its fp32 main params (and the hybrid optimizer its host copies) from the random
        # init when it was built; in bf16 they are copies, and the first step would write them back.
        self.optimizer.reload_model_params()

    # --- forward passes -------------------------------------------------------------------------------------------

    def _my_share(self, samples: Samples) -> list[int]:
        from megatron.core import parallel_state as ps

        return data_parallel_shard(samples.lengths(), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())

    def _micro_batches(self, samples: Samples, indices: list[int]) -> list[MicroBatch]:
        """Length buckets of ``indices``; every DP rank makes as many as the rank that needs the most."""
        from megatron.core import parallel_state as ps

        lengths = [samples.lengths()[i] for i in indices]
        pad = self.layout.tp if self.layout.sequence_parallel else 1
        buckets = bucket_by_length(lengths, self.config.actor.max_tokens_per_micro_batch, pad)
        count = torch.tensor([len(buckets)], device=self._device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        buckets = split_to_count(buckets, lengths, int(count.item()))
        return [make_micro_batch(samples, [indices[i] for i in bucket], pad, self._device) for bucket in buckets]

    @property
    def _device(self) -> torch.device:
        return next(self.model[0].parameters()).device

    def _run_schedule(
        self, model, micro_batches: list[MicroBatch], loss_func, forward_only: bool, used_routing: list | None = None
    ) -> list[dict]:
        """Megatron's schedule over ``micro_batches``. On the policy, micro-batches with ``replay_routing`` replay it
        (forward and recompute); the others route naturally. ``used_routing`` collects ``(indices, routing)`` of
        each micro-batch's forward (recorded, or replayed)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        routing = self.routing_replay if model is self.model and self.routing_replay is not None else None

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            if routing is not None:
                if batch.replay_routing is not None:
                    routing.replay(batch.replay_routing, batch.tokens.shape[1])
                elif used_routing is not None:
                    routing.record()
            logits = chunk(input_ids=batch.tokens, position_ids=batch.positions, attention_mask=None)
            if routing is not None and used_routing is not None:
                used_routing.append((batch.indices, routing.recorded(*batch.tokens.shape)))
            if routing is not None and batch.replay_routing is not None:
                routing.replay_recompute_after(logits)
            return logits, partial(loss_func, batch)

        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro_batches),
                model=model,
                num_microbatches=len(micro_batches),
                seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
                micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
                forward_only=forward_only,
            )
        finally:
            if routing is not None:
                routing.stop()

    def _response_log_probs(self, batch: MicroBatch, logits: torch.Tensor, *, training: bool = False):
        """Log-probs of the response tokens (and, when training, the entropy) at the rollout temperature."""
        from megatron.core import parallel_state as ps

        result = vocab_parallel_log_probs(
            logits,
            batch.targets,
            tp_group=ps.get_tensor_model_parallel_group(),
            vocab_size=self.arch.vocab_size,
            temperature=self.config.rollout.temperature,
            chunk_size=self.config.actor.log_prob_chunk_size,
            return_entropy=training,
            # Nothing reads the output layer's logits after the loss, so their storage takes the gradient.
            inplace_backward=training,
        )
        gather = partial(torch.gather, dim=1, index=batch.response_index)
        return tuple(gather(r) for r in result) if training else gather(result)

    @torch.no_grad()
    def compute_log_probs(self, samples: Samples, *, reference: bool = False) -> torch.Tensor:
        """Response log-probs ``[n, R]`` of every sample under the current (or the reference) policy, on every rank.

        Each DP rank computes its share; the rows are disjoint, so a sum over DP assembles the whole batch. On the
        policy of an MoE model, ``samples.replay_routing`` (when set) is replayed; with the engine's routing at hand,
        ``samples.extra["router_agreement"]`` says how much of it this pass used; with ``actor.router_replay.mode``
        R2, ``samples.trainer_routing`` becomes the routing this pass used.
        """
        from megatron.core import parallel_state as ps

        model = self.reference if reference else self.model
        for chunk in model:
            chunk.eval()
        indices = self._my_share(samples)
        micro_batches = self._micro_batches(samples, indices)

        def loss_func(batch, logits):
            return logits.sum() * 0, {"log_probs": self._response_log_probs(batch, logits)}

        routing = self.routing_replay if not reference else None
        r2 = self.config.actor.router_replay.mode == "R2"
        used = [] if routing is not None and (r2 or samples.routed_experts is not None) else None
        outputs = self._run_schedule(model, micro_batches, loss_func, forward_only=True, used_routing=used)
        if used is not None and samples.routed_experts is not None:
            samples.extra["router_agreement"] = routing.agreement(used, samples.routed_experts, samples.lengths())
        if used is not None and r2:  # every rank may update on any sample: they all get the whole batch's
            samples.trainer_routing = routing.gather_per_sample(used, samples.lengths(), self.arch.num_layers)
        result = torch.zeros(len(samples), samples.max_response_len, device=self._device)
        if ps.is_pipeline_last_stage():
            for batch, output in zip(micro_batches, outputs):
                result[batch.indices, : output["log_probs"].shape[1]] = output["log_probs"].float()
        dist.all_reduce(result, group=ps.get_data_parallel_group())
        return self._from_last_stage(result)

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if self.layout.pp > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(tensor, src=last, group=ps.get_pipeline_model_parallel_group())
        return tensor

    # --- the update -----------------------------------------------------------------------------------------------

    def update(self, samples: Samples, mini_batches: list[list[int]]) -> dict[str, float]:
        """One optimizer step per mini-batch (lists of sample indices), ``ppo_epochs`` times; averaged metrics."""
        from megatron.core import parallel_state as ps

        actor = self.config.actor
        for chunk in self.model:
            chunk.train()
        step_metrics: list[dict[str, float]] = []
        for _ in range(actor.ppo_epochs):
            for mini_batch in mini_batches:
                part = samples.select(mini_batch)
                indices = self._my_share(part)
                micro_batches = self._micro_batches(part, indices)
                denominator = sum(loss_denominator(mb.loss_mask, actor.loss_agg_mode) for mb in micro_batches)
                denominator = torch.as_tensor(denominator, dtype=torch.float32, device=self._device)
                dist.all_reduce(denominator, group=ps.get_data_parallel_group())
                # Megatron divides each micro-batch loss by their count and DDP averages over DP ranks; the
                # scale undoes both, so that the micro-batch losses sum to the global-batch loss.
                scale = ps.get_data_parallel_world_size() * len(micro_batches)
                for chunk in self.model:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                outputs = self._run_schedule(
                    self.model, micro_batches, partial(self._loss, denominator=denominator, scale=scale), False
                )
                success, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(increment=1)
                metrics = self._reduce_metrics(outputs)
                metrics.update(grad_norm=float(grad_norm or 0.0), lr=self.optimizer.param_groups[0]["lr"])
                metrics["update_skipped"] = float(not success)
                step_metrics.append(metrics)
        if self.model[0].ddp_config.overlap_param_gather:
            # The all-gather of the updated params would wait for the next forward pass; the checkpoint and the
            # weight sync read them before that.
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
        return {key: sum(m[key] for m in step_metrics) / len(step_metrics) for key in step_metrics[0]}

    def _loss(self, batch: MicroBatch, logits: torch.Tensor, *, denominator, scale):
        actor = self.config.actor
        log_probs, entropy = self._response_log_probs(batch, logits, training=True)
        tokens = batch.per_token
        params = {"tau_pos": actor.tau_pos, "tau_neg": actor.tau_neg}
        if actor.policy_loss.loss_mode in ("vanilla", "gspo"):
            params = {"clip_ratio_low": actor.clip_ratio_low, "clip_ratio_high": actor.clip_ratio_high}
            if actor.policy_loss.loss_mode == "vanilla":
                params["clip_ratio_c"] = actor.clip_ratio_c
        loss, metrics = policy_loss(
            actor.policy_loss.loss_mode,
            log_probs=log_probs,
            old_log_probs=tokens["old_log_probs"],
            advantages=tokens["advantages"],
            response_mask=batch.loss_mask,
            loss_agg_mode=actor.loss_agg_mode,
            rollout_log_probs=tokens.get("rollout_log_probs") if actor.tis_cap is not None else None,
            tis_cap=actor.tis_cap or 1.0,
            rollout_is_weights=tokens.get("rollout_is_weights"),
            ref_log_probs=tokens.get("ref_log_probs") if actor.use_kl_loss else None,
            kl_coef=actor.kl_loss_coef if actor.use_kl_loss else 0.0,
            kl_type=actor.kl_loss_type,
            # The entropy enters the graph only when it is part of the loss; otherwise it is a metric.
            entropy=entropy if actor.entropy_coeff else entropy.detach(),
            entropy_coef=actor.entropy_coeff,
            loss_denominator=denominator,
            seq_len_norm=self.config.data.max_response_length,
            **params,
        )
        return loss * scale, metrics

    def _reduce_metrics(self, outputs: list[dict]) -> dict[str, float]:
        """Micro-batch metrics → one value each, reduced over DP and handed from the last stage to every rank.

        ``SUMMED_METRICS`` add up (they were aggregated with the global denominator), ``TOKEN_MEAN_METRICS`` are
        averaged weighted by each micro-batch's token count, ``ratio_max`` is a max. A metric the loss did not
        produce (no KL term, no TIS) is left out.
        """
        from megatron.core import parallel_state as ps

        names = ("num_tokens", *SUMMED_METRICS, *TOKEN_MEAN_METRICS)
        totals = torch.zeros(2 * len(names), device=self._device)  # values, then "present" flags
        ratio_max = torch.zeros(1, device=self._device)
        if ps.is_pipeline_last_stage():
            for output in outputs:
                tokens = float(output["num_tokens"])
                for i, name in enumerate(names):
                    if name in output:
                        weight = tokens if name in TOKEN_MEAN_METRICS else 1.0
                        totals[i] += float(output[name]) * weight
                        totals[len(names) + i] = 1
                ratio_max = torch.maximum(ratio_max, output["ratio_max"].float().reshape(1))
        group = ps.get_data_parallel_group()
        dist.all_reduce(totals, group=group)
        dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX, group=group)
        reduced = self._from_last_stage(torch.cat([totals, ratio_max])).tolist()
        values, present = reduced[: len(names)], reduced[len(names) : 2 * len(names)]
        result = {"ratio_max": reduced[-1]}
        for name, value, seen in zip(names[1:], values[1:], present[1:]):
            if seen:
                result[name] = value / max(values[0], 1.0) if name in TOKEN_MEAN_METRICS else value
        return result

    # --- weights, checkpoints, offload ------------------------------------------------------------------------------

    def export_hf_weights(self):
        """Collective; yields ``(hf_name, tensor)`` on global rank 0 (see ``megatron_io.export_hf_weights``)."""
        return export_hf_weights(self.model, self.arch)

    def sharded_state_dict(self, *, is_loading: bool = False) -> dict:
        """Model, optimizer, LR scheduler and this rank's RNG states, as one Megatron sharded state dict."""
        # The bare model's keys (no DDP "module." prefix): a trainer checkpoint reads like a converted one, so
        # tools/convert_mcore_to_hf.py exports it and model.mcore_checkpoint can start from it.
        model_state = unwrap_model(self.model[0]).sharded_state_dict()
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=OPTIMIZER_CHECKPOINT_FORMAT
            ),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_sharded_object(),
        }

    def load_checkpoint(self, ckpt_dir: str) -> None:
        from megatron_sapo.checkpoint import load_sharded

        self._allocate_torch_optimizer_state()
        state = load_sharded(self.sharded_state_dict(is_loading=True), ckpt_dir, field="trainer.resume")
        unwrap_model(self.model[0]).load_state_dict(state["model"])
        with torch.no_grad():  # fp32 main params are views of the model's parameters, which require grad
            self.optimizer.load_state_dict(state["optimizer"])
        self._restore_adam_steps()
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    def _restore_adam_steps(self) -> None:
        """Give every parameter its own Adam ``step`` tensor, holding the step count the checkpoint saved.

        megatron-core 0.16.1 saves torch Adam's step once per param group (``DistributedOptimizer.state_dict``) and,
        without apex/TE, loads it wrong twice over: ``load_state_dict`` puts ONE tensor into every parameter's state
        (``s["step"] = step``), and the ``dp_reshardable`` loader then copies into it the step the state had when
        ``sharded_state_dict(is_loading=True)`` was built, i.e. 0. torch's Adam adds 1 to each parameter's step in
        place, so the shared tensor would count parameters instead of steps: bias correction restarts and then
        runs as many times too fast as there are parameters. The saved count survives in the param groups."""
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = optimizer.optimizer
            for group in inner.param_groups:
                for param in group["params"]:
                    state = inner.state.get(param)
                    if not state or "step" not in state:
                        continue
                    old = state["step"]
                    value = group["step"] if group.get("step") is not None else float(old)
                    state["step"] = torch.tensor(float(value), dtype=old.dtype, device=old.device)

    def _allocate_torch_optimizer_state(self) -> None:
        """Give torch's Adam its per-parameter state (zeros, step 0) before a resume fills it in.

        Without apex or Transformer Engine, megatron-core's DistributedOptimizer reads the Adam step from that state
        to describe the checkpoint it loads, but torch creates it only at the first step, and a resume comes before
        any: megatron-core's own ``init_state_fn`` allocates the moments, the step is added here."""
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        if HAVE_APEX_OR_TE:
            return
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = optimizer.optimizer
            if len(inner.state) == 0 and optimizer.init_state_fn is not None:
                optimizer.init_state_fn(inner, optimizer.config)
                for param_state in inner.state.values():
                    param_state["step"] = torch.tensor(0.0)

    def offload(self) -> None:
        """The optimizer's own device tensors first (see ``parallel/offload.py``), then the param/grad buffers."""
        megatron = self.config.actor.megatron
        if megatron.optimizer_offload:
            self._optimizer_host_copies = offload.offload_optimizer(self.optimizer, self._optimizer_host_copies)
        if megatron.param_offload or megatron.grad_offload:
            offload.offload_params_and_grads(self.model, params=megatron.param_offload, grads=megatron.grad_offload)

    def reload(self) -> None:
        megatron = self.config.actor.megatron
        if megatron.param_offload or megatron.grad_offload:
            offload.reload_params_and_grads(self.model, params=megatron.param_offload, grads=megatron.grad_offload)
        if megatron.optimizer_offload:
            offload.reload_optimizer(self._optimizer_host_copies)
