"""What the policy and the critic share on Megatron-Core: DDP, the distributed (or hybrid CPU) optimizer and its LR
scheduler, data-parallel shares and length-bucketed micro-batches, Megatron's pipeline schedule, the optimizer-step
loop, offload, and the sharded checkpoint state with its Adam ``step`` repair.

Both models live on the same processes with the same TP/SP/PP/EP layout (``actor.megatron.*``); each has its own
chunks, DDP buffers and optimizer. Everything here is collective: every rank calls the same methods with the same
``Samples`` (the whole step's batch) and takes its data-parallel share.
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
from megatron_sapo.config import Config, OptimConfig
from megatron_sapo.loss import loss_denominator
from megatron_sapo.models import ModelOptions, transformer_engine_usable
from megatron_sapo.parallel import offload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Each rank writes its own optimizer shard, in parallel and without gathering (megatron-core 0.16's torch_dist
# backend no longer takes the flattened model-space format). The price: a resume must keep TP/PP/EP; DP may change.
OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def optimizer_config(config: Config, optim: OptimConfig | None = None):
    """Megatron's ``OptimizerConfig`` for ``optim`` (default: ``actor.optim``) and the hybrid CPU optimizer switches
    of ``actor.megatron``.

    The hybrid CPU optimizer runs through the precision-aware path: the fp32 main params live with the optimizer
    (on the host for the offloaded fraction) instead of beside the model on the GPU, and it keeps them whole
    (``store_param_remainders`` is TE FusedAdam's). megatron-core 0.16's ``OptimizerConfig.__post_init__`` asks
    Transformer Engine's version on that path only to decide ``store_param_remainders`` and fails when TE is not
    installed (``is_te_min_version``); without TE the three fields are set here as it would set them."""
    from megatron.core.optimizer import OptimizerConfig

    optim, megatron = optim or config.actor.optim, config.actor.megatron
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


def model_options(config: Config, *, routing_replay: bool) -> ModelOptions:
    """The model-building switches of ``actor.megatron`` (the critic is built with the actor's)."""
    megatron = config.actor.megatron
    te = megatron.use_transformer_engine
    te = transformer_engine_usable() if te is None else te
    return ModelOptions(
        params_dtype=DTYPES[config.model.dtype],
        moe_aux_loss_coeff=megatron.moe_aux_loss_coeff,
        moe_token_dispatcher_type=megatron.moe_token_dispatcher_type,
        moe_grouped_gemm=megatron.moe_grouped_gemm,
        recompute_granularity=megatron.recompute_granularity,
        recompute_num_layers=megatron.recompute_num_layers,
        use_transformer_engine=megatron.use_transformer_engine,
        fused_kernels=torch.cuda.is_available() and te,
        moe_enable_routing_replay=routing_replay,
    )


class MegatronWorker:
    """Model chunks under DDP with their optimizer and scheduler; subclasses build the chunks and define the loss."""

    routing_replay = None  # the actor's RoutingReplay on MoE models; the critic routes naturally

    def __init__(self, config: Config, arch, chunks: list, optim: OptimConfig, optimizer_steps_per_training_step: int):
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
        self.optimizer = get_megatron_optimizer(optimizer_config(config, optim), self.model)
        if megatron.optimizer_cpu_offload:
            # megatron-core builds the hybrid optimizer twice: from the model's params in get_megatron_optimizer,
            # then from their shards in DistributedOptimizer. The first, with fp32 host copies of all of this
            # rank's params, is held only by reference cycles (its step hooks): free it now, not at some later
            # garbage collection.
            gc.collect()
        self._optimizer_host_copies = None  # offload.HostCopies, allocated at the first offload
        steps = config.trainer.total_steps * optimizer_steps_per_training_step
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

    # --- micro-batches and the pipeline schedule -------------------------------------------------------------------

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

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if self.layout.pp > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(tensor, src=last, group=ps.get_pipeline_model_parallel_group())
        return tensor

    def _gather_per_token(self, samples: Samples, micro_batches: list[MicroBatch], outputs: list[dict], key: str):
        """``[n, R]`` on every rank from each micro-batch's ``output[key]`` (``[b, R_mb]``, last stage): each DP rank
        fills its rows, the rows are disjoint, so a sum over DP assembles the batch; then the last stage's goes out."""
        from megatron.core import parallel_state as ps

        result = torch.zeros(len(samples), samples.max_response_len, device=self._device)
        if ps.is_pipeline_last_stage():
            for batch, output in zip(micro_batches, outputs):
                result[batch.indices, : output[key].shape[1]] = output[key].float()
        dist.all_reduce(result, group=ps.get_data_parallel_group())
        return self._from_last_stage(result)

    # --- the update -----------------------------------------------------------------------------------------------

    def _optimizer_steps(self, samples: Samples, mini_batches: list[list[int]], *, epochs: int, loss_agg_mode: str,
                         loss, reduce, mask: str = "loss_mask") -> dict[str, float]:  # fmt: skip
        """One optimizer step per mini-batch (lists of sample indices), ``epochs`` times; averaged metrics.

        ``loss(batch, output, *, denominator, scale)`` is each micro-batch's loss function, ``reduce(outputs)``
        turns a step's micro-batch metrics into one dict on every rank; ``mask`` names the MicroBatch mask the
        loss aggregates over (the actor's ``loss_mask`` drops rejected tokens, the critic's ``response_mask``
        keeps them, as verl's critic does)."""
        from megatron.core import parallel_state as ps

        for chunk in self.model:
            chunk.train()
        step_metrics: list[dict[str, float]] = []
        for _ in range(epochs):
            for mini_batch in mini_batches:
                part = samples.select(mini_batch)
                indices = self._my_share(part)
                micro_batches = self._micro_batches(part, indices)
                denominator = sum(loss_denominator(getattr(mb, mask), loss_agg_mode) for mb in micro_batches)
                denominator = torch.as_tensor(denominator, dtype=torch.float32, device=self._device)
                dist.all_reduce(denominator, group=ps.get_data_parallel_group())
                # Megatron divides each micro-batch loss by their count and DDP averages over DP ranks; the
                # scale undoes both, so that the micro-batch losses sum to the global-batch loss.
                scale = ps.get_data_parallel_world_size() * len(micro_batches)
                for chunk in self.model:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                outputs = self._run_schedule(
                    self.model, micro_batches, partial(loss, denominator=denominator, scale=scale), False
                )
                success, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(increment=1)
                metrics = reduce(outputs)
                metrics.update(grad_norm=float(grad_norm or 0.0), lr=self.optimizer.param_groups[0]["lr"])
                metrics["update_skipped"] = float(not success)
                step_metrics.append(metrics)
        if self.model[0].ddp_config.overlap_param_gather:
            # The all-gather of the updated params would wait for the next forward pass; the checkpoint and the
            # weight sync read them before that.
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
        return {key: sum(m[key] for m in step_metrics) / len(step_metrics) for key in step_metrics[0]}

    def _reduce_micro_batch_metrics(self, outputs: list[dict], summed: tuple, token_mean: tuple,
                                    maxed: tuple = ()) -> dict[str, float]:  # fmt: skip
        """Micro-batch metrics → one value each, reduced over DP and handed from the last stage to every rank:
        ``summed`` add up, ``token_mean`` are averaged weighted by each micro-batch's ``num_tokens``, ``maxed`` are
        maxima. A metric no micro-batch produced is left out (``maxed`` ones must always be there)."""
        from megatron.core import parallel_state as ps

        names = ("num_tokens", *summed, *token_mean)
        totals = torch.zeros(2 * len(names), device=self._device)  # values, then "present" flags
        maxima = torch.zeros(len(maxed), device=self._device)
        if ps.is_pipeline_last_stage():
            for output in outputs:
                tokens = float(output["num_tokens"])
                for i, name in enumerate(names):
                    if name in output:
                        weight = tokens if name in token_mean else 1.0
                        totals[i] += float(output[name]) * weight
                        totals[len(names) + i] = 1
                for i, name in enumerate(maxed):
                    maxima[i] = torch.maximum(maxima[i], output[name].float().reshape(()))
        group = ps.get_data_parallel_group()
        dist.all_reduce(totals, group=group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        reduced = self._from_last_stage(torch.cat([totals, maxima])).tolist()
        values, present = reduced[: len(names)], reduced[len(names) : 2 * len(names)]
        result = {name: reduced[2 * len(names) + i] for i, name in enumerate(maxed)}
        for name, value, seen in zip(names[1:], values[1:], present[1:]):
            if seen:
                result[name] = value / max(values[0], 1.0) if name in token_mean else value
        return result

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def _sharded_training_state(self, *, is_loading: bool) -> dict:
        """Model, optimizer and LR scheduler as a Megatron sharded state dict."""
        from megatron_sapo.convert.megatron_io import unwrap_model

        if not is_loading:
            self._allocate_torch_optimizer_state(any_backend=True)  # an optimizer that has not stepped yet
        # The bare model's keys (no DDP "module." prefix): a trainer checkpoint reads like a converted one, so
        # tools/convert_mcore_to_hf.py exports it and model.mcore_checkpoint can start from it.
        model_state = unwrap_model(self.model[0]).sharded_state_dict()
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=OPTIMIZER_CHECKPOINT_FORMAT
            ),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_checkpoint_state(self, ckpt_dir: str, *, field: str, extra: dict | None = None) -> dict:
        """Collective: model, optimizer and scheduler (and ``extra`` sharded entries) from ``ckpt_dir``."""
        self._allocate_torch_optimizer_state()
        sharded = {**self._sharded_training_state(is_loading=True), **(extra or {})}
        return self._load_training_state(sharded, ckpt_dir, field=field)

    def _load_training_state(self, sharded_state_dict: dict, ckpt_dir: str, *, field: str) -> dict:
        """Load model, optimizer and scheduler from ``ckpt_dir``; returns the loaded state (for the caller's rest)."""
        from megatron_sapo.checkpoint import load_sharded
        from megatron_sapo.convert.megatron_io import unwrap_model

        state = load_sharded(sharded_state_dict, ckpt_dir, field=field)
        unwrap_model(self.model[0]).load_state_dict(state["model"])
        with torch.no_grad():  # fp32 main params are views of the model's parameters, which require grad
            self.optimizer.load_state_dict(state["optimizer"])
        self._restore_adam_steps()
        self.scheduler.load_state_dict(state["scheduler"])
        return state

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

    def _allocate_torch_optimizer_state(self, *, any_backend: bool = False) -> None:
        """Give Adam its per-parameter state (zeros, step 0) as its first step would, where it has none yet.

        Before a resume: without apex or Transformer Engine, megatron-core's DistributedOptimizer reads the Adam step
        from that state to describe the checkpoint it loads, but torch creates it only at the first step, and a
        resume comes before any (with apex/TE megatron allocates it itself). Before a save (``any_backend``): the
        actor has not stepped during ``trainer.critic_warmup``, and megatron-core 0.16.1's
        ``DistributedOptimizer.state_dict`` asserts one Adam step count over the state (without apex/TE) and its
        ``dp_reshardable`` format reads every parameter's moments. megatron-core's own ``init_state_fn`` allocates
        the moments (only where missing), the step is added here; the first step then computes as from nothing."""
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        if HAVE_APEX_OR_TE and not any_backend:
            return
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = optimizer.optimizer
            if len(inner.state) == 0 and optimizer.init_state_fn is not None:
                optimizer.init_state_fn(inner, optimizer.config)
                if not HAVE_APEX_OR_TE:
                    for param_state in inner.state.values():
                        param_state["step"] = torch.tensor(0.0)

    # --- offload ----------------------------------------------------------------------------------------------------

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
