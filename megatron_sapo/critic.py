"""The critic on Megatron-Core: the policy's trunk with a scalar value head, for ``algorithm.adv_estimator=gae``.

It runs on the actor's processes with the actor's layout (TP/SP/PP/EP, ``actor.megatron.*``) and shares its
machinery (``worker.py``): DDP, the distributed or hybrid CPU optimizer (``critic.optim``), length-bucketed
micro-batches, the pipeline schedule, offload and the sharded checkpoint state. The model is ``build_model``'s
GPTModel, untied, whose last stage's output layer is replaced by :class:`ValueHead` (hidden → 1).

Values are those of the state before each response token, as the log-probs: the output at the position whose
logits predict response token ``j`` (verl's ``values[:, -response_length - 1 : -1]``), ``[n, R]``, zero past each
response's end.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from megatron_sapo.batch import MicroBatch, Samples
from megatron_sapo.config import Config
from megatron_sapo.convert.megatron_io import load_hf_weights, unwrap_model
from megatron_sapo.errors import InputError
from megatron_sapo.loss import value_loss
from megatron_sapo.models import ModelArch, build_model
from megatron_sapo.worker import DTYPES, MegatronWorker, model_options

# The value head's init when the critic's checkpoint has none: normal(0, std) as transformers initialises a
# *ForTokenClassification score layer (initializer_range, 0.02 in the Qwen configs), drawn from a generator seeded
# with actor.megatron.seed, so every rank and every layout starts from the same head.
VALUE_HEAD_INIT_STD = 0.02
# transformers' *ForTokenClassification (and verl's critic HF export) keep the value head here: weight [1, hidden]
# and bias [1] (its score layer is an nn.Linear with bias; verl's Megatron critic reads only the weight).
HF_VALUE_HEAD, HF_VALUE_BIAS = "score.weight", "score.bias"
# Keys that an HF folder for the critic may hold beside the trunk: the LM head of a causal-LM checkpoint (unused)
# and the value head.
HF_CRITIC_EXTRAS = ("lm_head.weight", HF_VALUE_HEAD, HF_VALUE_BIAS)
CRITIC_SUMMED_METRICS = ("vf_loss",)
CRITIC_TOKEN_MEAN_METRICS = ("vf_clipfrac", "vpred_mean")


class ValueHead(torch.nn.Module):
    """hidden → 1 (weight and bias, as transformers' score layer), replicated over TP, in the GPTModel's
    ``output_layer`` slot (megatron-core 0.16.1 calls it as ``output_layer(hidden, weight=None,
    runtime_gather_output=...)`` and takes ``(output, bias)``).

    With sequence parallelism its input is this rank's slice of the sequence: the values are gathered over TP, and
    in backward each rank keeps its slice's gradient (``tensor_parallel_output_grad=False``), so the weight's
    gradient is partial per rank; marking it ``sequence_parallel`` makes megatron's ``finalize_model_grads`` sum it
    over TP, as it does the LayerNorm weights. Without the ``tensor_model_parallel`` attribute the grad norm counts
    them on TP rank 0 only."""

    def __init__(self, weight: torch.Tensor, sequence_parallel: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(weight.new_zeros(1))
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:
            self.weight.sequence_parallel = self.bias.sequence_parallel = True

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        values = torch.nn.functional.linear(hidden_states, self.weight, self.bias).float()  # [s, b, 1]
        if self.sequence_parallel:
            values = gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False)
        return values, None


def initial_head_weight(hidden_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, hidden_size, generator=generator, dtype=torch.float32) * VALUE_HEAD_INIT_STD


@contextlib.contextmanager
def _without_head(chunks: list):
    """The chunks with their value head out of the module tree, so that the weight mapping sees the trunk alone."""
    heads = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        if isinstance(getattr(model, "output_layer", None), ValueHead):
            heads.append((model, model.output_layer))
            model.output_layer = torch.nn.Identity()
    try:
        yield
    finally:
        for model, head in heads:
            model.output_layer = head


def check_critic_checkpoint(reader, arch: ModelArch, field: str) -> bool:
    """The trunk's tensors present with the actor's shapes, nothing but ``HF_CRITIC_EXTRAS`` beside them; returns
    whether the folder brings a value head."""
    from megatron_sapo.convert.mapping import hf_shapes

    expected = {name: shape for name, shape in hf_shapes(arch).items() if name != "lm_head.weight"}
    names = reader.names()
    for name, shape in expected.items():
        if name not in names:
            raise InputError(f"{field}={reader.hf_dir}: missing tensor {name}; the critic's checkpoint must hold the "
                             "actor's trunk")  # fmt: skip
        if tuple(reader.shape(name)) != shape:
            raise InputError(f"{field}={reader.hf_dir}: tensor {name} has shape {list(reader.shape(name))}, the "
                             f"actor's architecture needs {list(shape)}")  # fmt: skip
    extra = sorted(names - set(expected) - set(HF_CRITIC_EXTRAS))
    if extra:
        raise InputError(f"{field}={reader.hf_dir}: unexpected tensor {extra[0]}; the critic's checkpoint must have "
                         "the actor's architecture")  # fmt: skip
    for name, shape in ((HF_VALUE_HEAD, (1, arch.hidden_size)), (HF_VALUE_BIAS, (1,))):
        if name in names and tuple(reader.shape(name)) != shape:
            raise InputError(f"{field}={reader.hf_dir}: {name} has shape {list(reader.shape(name))}, a value head's "
                             f"is {list(shape)} (one label)")  # fmt: skip
    return HF_VALUE_HEAD in names


class MegatronCritic(MegatronWorker):
    def __init__(self, config: Config, arch: ModelArch):
        self.config, self.arch = config, arch
        self.layout = config.actor.megatron.layout
        # Untied: the head replaces the output layer, the embedding stays the trunk's own.
        self.model_arch = dataclasses.replace(arch, tie_word_embeddings=False)
        chunks = build_model(self.model_arch, self.layout, model_options(config, routing_replay=False))
        head = initial_head_weight(arch.hidden_size, config.actor.megatron.seed).to(DTYPES[config.model.dtype])
        for chunk in chunks:
            if chunk.post_process:
                chunk.output_layer = ValueHead(head.clone(), self.layout.sequence_parallel)
        critic = config.critic
        steps = config.data.train_batch_size // critic.ppo_mini_batch_size * critic.ppo_epochs
        super().__init__(config, arch, chunks, critic.optim, steps)

    @property
    def _head(self) -> ValueHead | None:
        model = unwrap_model(self.model[0])
        return model.output_layer if model.post_process else None

    def load_initial_weights(self) -> None:
        """The trunk from ``critic.model.path`` (default: ``model.mcore_checkpoint``, else ``model.path``); the head
        from the folder's ``score.weight`` (and ``score.bias``) when it has one, else the seeded init (bias 0)."""
        from megatron_sapo.checkpoint import load_sharded
        from megatron_sapo.convert.hf_io import HFCheckpointReader

        path, mcore = self.config.critic.model.path, self.config.model.mcore_checkpoint
        if path is None and mcore:
            model = unwrap_model(self.model[0])
            sharded = {"model": model.sharded_state_dict()}
            for key in [k for k in sharded["model"] if k.startswith("output_layer.")]:
                del sharded["model"][key]  # the value head: the checkpoint holds the LM head there
            state = load_sharded(sharded, mcore, field="model.mcore_checkpoint")
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
            assert not unexpected and all(k.startswith("output_layer.") for k in missing), (missing, unexpected)
        else:
            field = "critic.model.path" if path is not None else "model.path"
            reader = HFCheckpointReader(path or self.config.model.path)
            has_head = check_critic_checkpoint(reader, self.arch, field)
            with _without_head(self.model):
                load_hf_weights(self.model, reader, self.model_arch)
            if has_head and self._head is not None:
                with torch.no_grad():
                    self._head.weight.copy_(reader.get(HF_VALUE_HEAD))
                    if HF_VALUE_BIAS in reader.names():
                        self._head.bias.copy_(reader.get(HF_VALUE_BIAS))
        # As the actor: the optimizer's fp32 main params were taken from the random init.
        self.optimizer.reload_model_params()

    # --- values and the update ------------------------------------------------------------------------------------

    @staticmethod
    def _response_values(batch: MicroBatch, output: torch.Tensor) -> torch.Tensor:
        """``[b, R]`` values of the states before each response token; 0 past a response's end."""
        values = torch.gather(output[..., 0], 1, batch.response_index)
        return values * batch.response_mask

    @torch.no_grad()
    def compute_values(self, samples: Samples) -> torch.Tensor:
        """Values ``[n, R]`` of every sample on every rank (each DP rank computes its share)."""
        for chunk in self.model:
            chunk.eval()
        micro_batches = self._micro_batches(samples, self._my_share(samples))

        def loss_func(batch, output):
            return output.sum() * 0, {"values": self._response_values(batch, output)}

        outputs = self._run_schedule(self.model, micro_batches, loss_func, forward_only=True)
        return self._gather_per_token(samples, micro_batches, outputs, "values")

    def update(self, samples: Samples, mini_batches: list[list[int]]) -> dict[str, float]:
        """verl's critic update: ``critic.ppo_epochs`` × one optimizer step per mini-batch on the clipped value loss
        against ``samples.returns``, clipped around ``samples.values``; averaged metrics."""
        critic = self.config.critic
        return self._optimizer_steps(samples, mini_batches, epochs=critic.ppo_epochs,
                                     loss_agg_mode=critic.loss_agg_mode, loss=self._loss,
                                     reduce=self._reduce_metrics, mask="response_mask")  # fmt: skip

    def _loss(self, batch: MicroBatch, output: torch.Tensor, *, denominator, scale):
        critic = self.config.critic
        loss, metrics = value_loss(
            self._response_values(batch, output),
            batch.per_token["values"],
            batch.per_token["returns"],
            batch.response_mask,
            cliprange_value=critic.cliprange_value,
            loss_agg_mode=critic.loss_agg_mode,
            loss_denominator=denominator,
        )
        return loss * scale, metrics

    def _reduce_metrics(self, outputs: list[dict]) -> dict[str, float]:
        return self._reduce_micro_batch_metrics(outputs, CRITIC_SUMMED_METRICS, CRITIC_TOKEN_MEAN_METRICS)

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def sharded_state_dict(self, *, is_loading: bool = False) -> dict:
        """Model, optimizer and LR scheduler (the RNG states are the actor's part of the checkpoint)."""
        return self._sharded_training_state(is_loading=is_loading)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        self.load_checkpoint_state(ckpt_dir, field="trainer.resume (critic)")
