"""The policy on Megatron-Core: model chunks, DDP, the distributed optimizer, log-probs and the policy update.

Everything here is collective: every rank calls the same methods with the same ``Samples`` (the whole step's
batch); each rank takes its data-parallel share, and Megatron's pipeline schedule runs the micro-batches.
Per-token results (log-probs) come back on every rank for the samples of its data-parallel share.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megatron_sapo.batch import MicroBatch, Samples
from megatron_sapo.config import Config
from megatron_sapo.convert.megatron_io import export_hf_weights, load_hf_weights, unwrap_model
from megatron_sapo.loss import policy_loss, vocab_parallel_log_probs
from megatron_sapo.models import ModelArch, build_model
from megatron_sapo.models.routing_replay import RoutingReplay
from megatron_sapo.parallel.cpu_device import device
from megatron_sapo.worker import MegatronWorker, model_options

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


class MegatronActor(MegatronWorker):
    def __init__(self, config: Config, arch: ModelArch):
        self.config, self.arch = config, arch
        self.layout = config.actor.megatron.layout
        # Replay needs it; with replay off the routers only record, for rollout/router_agreement.
        self.model_options = model_options(config, routing_replay=any(arch.moe_layer_pattern))
        chunks = build_model(arch, self.layout, self.model_options)
        self.routing_replay = RoutingReplay(chunks) if any(arch.moe_layer_pattern) else None
        super().__init__(config, arch, chunks, config.actor.optim, self.optimizer_steps_per_training_step)
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
        return self._gather_per_token(samples, micro_batches, outputs, "log_probs")

    # --- the update -----------------------------------------------------------------------------------------------

    def update(self, samples: Samples, mini_batches: list[list[int]]) -> dict[str, float]:
        """One optimizer step per mini-batch (lists of sample indices), ``ppo_epochs`` times; averaged metrics."""
        actor = self.config.actor
        return self._optimizer_steps(samples, mini_batches, epochs=actor.ppo_epochs, loss_agg_mode=actor.loss_agg_mode,
                                     loss=self._loss, reduce=self._reduce_metrics)  # fmt: skip

    def _loss(self, batch: MicroBatch, logits: torch.Tensor, *, denominator, scale):
        actor = self.config.actor
        log_probs, entropy = self._response_log_probs(batch, logits, training=True)
        tokens = batch.per_token
        params = {"tau_pos": actor.tau_pos, "tau_neg": actor.tau_neg}
        if actor.policy_loss.loss_mode in ("vanilla", "gspo"):
            params = dict(zip(("clip_ratio_low", "clip_ratio_high"), actor.clip_range))
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
        """``SUMMED_METRICS`` add up (they were aggregated with the global denominator), ``TOKEN_MEAN_METRICS`` are
        averaged weighted by each micro-batch's token count, ``ratio_max`` is a max. A metric the loss did not
        produce (no KL term, no TIS) is left out."""
        return self._reduce_micro_batch_metrics(outputs, SUMMED_METRICS, TOKEN_MEAN_METRICS, maxed=("ratio_max",))

    # --- weights, checkpoints, offload ------------------------------------------------------------------------------

    def export_hf_weights(self):
        """Collective; yields ``(hf_name, tensor)`` on global rank 0 (see ``megatron_io.export_hf_weights``)."""
        return export_hf_weights(self.model, self.arch)

    def sharded_state_dict(self, *, is_loading: bool = False) -> dict:
        """Model, optimizer, LR scheduler and this rank's RNG states, as one Megatron sharded state dict."""
        return {**self._sharded_training_state(is_loading=is_loading), "rng": rng_sharded_object()}

    def load_checkpoint(self, ckpt_dir: str) -> None:
        state = self.load_checkpoint_state(ckpt_dir, field="trainer.resume", extra={"rng": rng_sharded_object()})
        set_rng_state(state["rng"])
