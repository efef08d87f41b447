"""The policy on Megatron-Core: model chunks, DDP, the distributed optimizer, log-probs and the policy update.

Everything here is collective: every rank calls the same methods with the same ``Samples`` (the whole step's
batch); each rank takes its data-parallel share, and Megatron's pipeline schedule runs the micro-batches.
Per-token results (log-probs) come back on every rank for the samples of its data-parallel share.
"""

from __future__ import annotations

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
from megatron_sapo.models.qwen3_moe import ModelOptions, Qwen3MoeArch, build_model
from megatron_sapo.parallel import offload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Each rank writes its own optimizer shard, in parallel and without gathering (megatron-core 0.16's torch_dist
# backend no longer takes the flattened model-space format). The price: a resume must keep TP/PP/EP; DP may change.
OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
# How policy_loss's micro-batch metrics combine over micro-batches and DP ranks (see _reduce_metrics).
SUMMED_METRICS = ("pg_loss", "kl_loss", "entropy")
TOKEN_MEAN_METRICS = ("ratio_mean", "grad_weight_mean", "grad_weight_low_frac", "approx_kl", "tis_weight_mean",
                      "tis_capped_frac")  # fmt: skip


class MegatronActor:
    def __init__(self, config: Config, arch: Qwen3MoeArch):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.config, self.arch = config, arch
        megatron = config.actor.megatron
        self.layout = megatron.layout
        dtype = DTYPES[config.model.dtype]
        self.model_options = ModelOptions(
            params_dtype=dtype,
            moe_aux_loss_coeff=megatron.moe_aux_loss_coeff,
            moe_token_dispatcher_type=megatron.moe_token_dispatcher_type,
            moe_grouped_gemm=megatron.moe_grouped_gemm,
            recompute_granularity=megatron.recompute_granularity,
            recompute_num_layers=megatron.recompute_num_layers,
            use_transformer_engine=megatron.use_transformer_engine,
        )
        chunks = build_model(arch, self.layout, self.model_options)
        model_config = chunks[0].config
        model_config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        self.model = [DistributedDataParallel(model_config, ddp_config, chunk) for chunk in chunks]
        optim = config.actor.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
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
                optimizer_cpu_offload=megatron.optimizer_cpu_offload,
                optimizer_offload_fraction=megatron.optimizer_offload_fraction,
                # Megatron's hybrid CPU optimizer runs through this path; it also keeps the fp32 main params
                # with the optimizer state instead of beside the model on the GPU.
                use_precision_aware_optimizer=megatron.optimizer_cpu_offload,
            ),
            self.model,
        )
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
                chunk.requires_grad_(False)

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

    def _run_schedule(self, model, micro_batches: list[MicroBatch], loss_func, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            logits = chunk(input_ids=batch.tokens, position_ids=batch.positions, attention_mask=None)
            return logits, partial(loss_func, batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

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

        Each DP rank computes its share; the rows are disjoint, so a sum over DP assembles the whole batch.
        """
        from megatron.core import parallel_state as ps

        model = self.reference if reference else self.model
        for chunk in model:
            chunk.eval()
        indices = self._my_share(samples)
        micro_batches = self._micro_batches(samples, indices)

        def loss_func(batch, logits):
            return logits.sum() * 0, {"log_probs": self._response_log_probs(batch, logits)}

        outputs = self._run_schedule(model, micro_batches, loss_func, forward_only=True)
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
                denominator = sum(loss_denominator(mb.response_mask, actor.loss_agg_mode) for mb in micro_batches)
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
            response_mask=batch.response_mask,
            loss_agg_mode=actor.loss_agg_mode,
            rollout_log_probs=tokens.get("rollout_log_probs") if actor.tis_cap is not None else None,
            tis_cap=actor.tis_cap or 1.0,
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
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        # The bare model's keys (no DDP "module." prefix): a trainer checkpoint reads like a converted one, so
        # tools/convert_mcore_to_hf.py exports it and model.mcore_checkpoint can start from it.
        model_state = unwrap_model(self.model[0]).sharded_state_dict()
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=OPTIMIZER_CHECKPOINT_FORMAT
            ),
            "scheduler": self.scheduler.state_dict(),
            "rng": ShardedObject("rng_state", rng, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0),
        }

    def load_checkpoint(self, ckpt_dir: str) -> None:
        from megatron_sapo.checkpoint import load_sharded

        self._allocate_torch_optimizer_state()
        state = load_sharded(self.sharded_state_dict(is_loading=True), ckpt_dir, field="trainer.resume")
        unwrap_model(self.model[0]).load_state_dict(state["model"])
        with torch.no_grad():  # fp32 main params are views of the model's parameters, which require grad
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if torch.cuda.is_available() and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])

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
        megatron = self.config.actor.megatron
        if megatron.param_offload or megatron.grad_offload:
            offload.offload_params_and_grads(self.model, params=megatron.param_offload, grads=megatron.grad_offload)
        if megatron.optimizer_offload:
            offload.offload_optimizer(self.optimizer)

    def reload(self) -> None:
        megatron = self.config.actor.megatron
        if megatron.param_offload or megatron.grad_offload:
            offload.reload_params_and_grads(self.model, params=megatron.param_offload, grads=megatron.grad_offload)
        if megatron.optimizer_offload:
            offload.reload_optimizer(self.optimizer)
