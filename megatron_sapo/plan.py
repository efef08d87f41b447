"""Per-GPU memory plan of a training config: will this layout fit the GPUs, in training and while rolling out?

    python -m megatron_sapo.plan --config recipes/qwen3_30b_a3b/config.yaml [--world-size N | --nodes N
        --gpus-per-node 8] [--gpu-memory-gib 80] [--headroom-gib 5] [--hf-config DIR] [key=value ...]

Prints a table (GiB per GPU, heaviest pipeline stage) and exits 0 when both phases fit, 1 when one does not, 2 on
bad input. Everything is computed from the config and the model's ``config.json`` with the formulas below; nothing
is measured. Sizes are bytes; ``h`` hidden size, ``q = heads·head_dim``, ``k = kv_heads·head_dim``, ``E`` experts,
``K`` experts per token, ``f`` expert width, ``F`` dense-MLP width, ``V`` padded vocabulary, ``L_s`` layers of the
stage; ``t, p, c, e, et`` = TP, PP, CP, EP, ETP; ``dp = world/(t·p·c)``, ``edp = world/(e·et·p)``.

Model state (how megatron_sapo's actor holds it: Megatron DDP with ``grad_reduce_in_fp32=True`` and the distributed
optimizer):

* parameters on a GPU, ``P = P_dense + P_expert``: attention ``h(q+2k) + qh`` per layer (``+ q+2k`` with q/k/v
  biases), the embedding on the first stage and the output layer on the last (``V·h`` each; a tied output layer is
  the embedding with PP=1 and a trained copy of it on the last stage with PP>1) and dense MLPs ``3hF`` are split by
  ``t``; the norms (``2h`` + q/k-norm ``2·head_dim`` per layer when the model has it, final ``h``) and the router
  (``E·h``) are replicated; routed experts
  ``E·3hf`` per MoE layer are split by ``e·et``. Vocab rows are padded (``ModelArch.padded_vocab_size``).
* params ``2P`` (bf16; ``4P`` for float32), grads ``4P`` (the fp32 grad buffer is not sharded: the distributed
  optimizer reduce-scatters inside it), each counted as Megatron's DDP buffer lays them out (:func:`buffer_numel`:
  every parameter starts at a multiple of 64 elements, the bucket ends at a multiple of ``lcm(dp, 128)``).
* optimizer: fp32 main params (bf16 models only) + Adam ``exp_avg``/``exp_avg_sq``, ``12`` bytes per parameter of
  the rank's shard ``S = P_dense/(dp·c) + P_expert/edp``. With ``optimizer_cpu_offload`` Megatron's hybrid optimizer
  keeps the fraction ``φ = optimizer_offload_fraction`` of the shard on the host: fp32 copy and Adam state,
  ``12·φ·S`` pageable bytes (torch's AdamW allocates them), and an fp32 gradient copy per parameter shard, pinned
  (``pin_cpu_grads``), each rounded up to a power of two by torch's pinned allocator (``CachingHostAllocator``;
  Qwen3-30B-A3B's expert weights: ×4/3); ``8(1-φ)S`` of Adam state stays on the GPU. megatron-core 0.16 builds
  the hybrid optimizer twice (``get_megatron_optimizer`` from the whole params, then ``DistributedOptimizer`` from
  their shards): the first holds fp32 copies of ``φ`` of the rank's params, ``4φP`` pageable bytes, until the
  actor frees it after the build (reported as start-up host memory). The fp32 main shard (``4S``)
  stays on the GPU unless Megatron's precision-aware optimizer path is used (:data:`PRECISION_AWARE_OPTIMIZER`,
  which mirrors ``actor.py``'s ``OptimizerConfig``); with it the GPU part is ``12(1-φ)S``.
* the KL reference policy (``actor.use_kl_loss``): ``2P`` more, never offloaded.
* the critic (``algorithm.adv_estimator=gae``): a second model state as above (params, grads, optimizer, offloaded
  with the actor's switches) on the same layout, with the output layer replaced by the ``h``-parameter value head.
  It trains and infers in turn with the actor, so its activations (no larger: no logits) do not add to the peak.

Activations, per micro-batch of ``T = actor.max_tokens_per_micro_batch`` padded tokens per DP rank, ``T' = T/(t·c)``
tokens per rank in the sequence-parallel regions (tensor-parallel regions hold ``T/c`` tokens of ``1/t`` of the
width, the same bytes). Korthikanti et al. 2022 (arXiv 2205.05198, Table 2) count ``34·h/t`` bytes per token and
layer with tensor and sequence parallelism, plus ``5·a·s²·b/t`` per layer for the attention scores; adapted to this
model (GQA, qk-norm, SwiGLU, no dropout, no biases) the tensors autograd keeps per ``T'`` token and layer are:

* attention ``4h + 6q + 6k``: input-norm input ``2h``, QKV input ``2h`` (kept sequence-sharded, re-gathered in
  backward), q/k-norm inputs ``2(q+k)``, rotated Q, K and V kept by flash attention ``2(q+2k)``, its output (= the
  output projection's input) ``2q``. Without Transformer Engine (``use_transformer_engine: false``) the unfused
  core attention also keeps the fp32 softmax output and the bf16 probabilities, ``6·(a/t)·s²·b`` per micro-batch
  (bounded by ``6·(a/t)·T·s_max``), Korthikanti's ``5as²b`` with our dtypes and no dropout mask.
* MoE ``4h + 8E + K·et·2h + 6fK``: pre-MLP-norm input ``2h``, router input ``2h`` and its fp32 logits and probs
  ``8E``, the dispatched expert input ``2h`` for each of the ``K·et`` routed copies (balanced routing assumed: each
  rank receives the average ``K`` copies per token; ETP all-gathers them ``et``-fold), and per routed copy the fc1
  output ``4f/et`` and the probability-weighted SwiGLU output (fc2 input) ``2f/et``. That is with Megatron's fused
  SwiGLU (``bias_activation_fusion``, on with TE on GPU), which keeps only its input; the unfused one (no TE)
  also keeps the silu output and the SwiGLU output before the weighting, ``+4f/et`` (``10fK``).
* dense MLP ``4h + 6F``: norm input, fc1 input, fc1 output (gate and up), SwiGLU output (unfused: ``+2F``, silu).
* dispatcher buffers of the layer being computed ``2hK(2 + et)``: the permuted tokens before the all-to-all, the
  expert output before the ETP reduce-scatter and the combined tokens after the return all-to-all.

Cross-check: for multi-head attention (``q = k = h``) without qk-norm the attention term is ``12h``, Korthikanti's
``11h`` attention + ``2h`` layer-norm input − ``h`` dropout mask (we have no dropout).

Per-token scalars (norm statistics, softmax log-sum-exp; < 0.2% of the above) and integer token/position tensors are
omitted. With ``recompute_granularity``:

* ``null``: every layer's tensors are kept; ``selective``: the core-attention term is recomputed (with flash
  attention that term is already ~0, so selective only matters for the unfused path);
* ``full`` (Megatron's uniform method, ``N = recompute_num_layers``, default 1): only the input ``2h`` of every group
  of ``N`` layers is kept, and during backward one group is recomputed (``N`` layers' tensors).

Peak of a stage = kept tensors of the micro-batches in flight (1F1B: ``p - stage`` on stage ``stage``, an upper bound
that ignores the number of micro-batches) + the larger of (a) the recomputed group + one layer's gradients (as large
as its kept tensors) + the dispatcher buffers, and, on the last stage, (b) the output layer and the log-probs: the
final-norm and output-layer inputs ``4h·T'``, the bf16 vocab-parallel logits ``L = 2·(T/c)·(V/t)``, and the largest
of: a second copy of them (``GPTModel`` returns ``logits.transpose(0, 1).contiguous()``, made while the output
layer's own is alive; in backward the logits gradient, written into the logits' storage by ``inplace_backward``,
comes back transposed and the output layer's backward makes it contiguous), the forward work space (two fp32
chunks ``[C, V/t]``: shifted logits and their exp, as training computes the entropy) and the backward one (one fp32
chunk, two with ``entropy_coeff != 0``). ``C = min(actor.log_prob_chunk_size, T/c)``, ``T/c`` when it is null.
The forward-only passes (old and reference log-probs) keep nothing for backward and need less.

Two phases are checked against ``gpu_memory - headroom``. Training: all state resident plus the activation peak,
plus the SGLang servers' reservation unless ``rollout.enable_memory_saver`` lets them release it between rollouts
(``/release_memory_occupation``). Rollout: whatever ``param_offload``/``grad_offload``/``optimizer_offload`` leave on
the GPU (params move to a pinned host copy, the grad buffer is freed and re-zeroed on reload, optimizer tensors move
to host memory) plus the servers' static reservation ``rollout.mem_fraction_static × gpu_memory`` (weights + KV
cache) for ``rollout.backend: sglang``; the embedded server runs on the CPU and external servers own other GPUs, so
they reserve nothing here. The headroom (default 5 GiB) covers the CUDA context(s) (~0.5-1 GiB each, the trainer's
and a colocated engine's), NCCL communicator buffers of the TP/DP/EP/PP groups (~1-2 GiB), cuBLAS/TE work spaces,
the caching allocator's fragmentation, transient optimizer-step buffers (fused Adam updates in place, after the
activations are freed) and transient bf16 weight gradients (without apex's ``gradient_accumulation_fusion`` kernel
each weight's gradient, at most the output layer's ``2·V·h/t``, exists before it is added to the fp32 buffer).
Host memory is reported, not checked, as pinned (the offloaded params' copy, one per DDP buffer rounded to a power
of two; the optimizer offload's segments, ``parallel/offload.py``; the hybrid optimizer's gradient copies) and
pageable (the hybrid optimizer's fp32 params and Adam moments).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_sapo.errors import InputError
from megatron_sapo.hub import parse_hub_id, resolve_model_path
from megatron_sapo.models import ModelArch, load_arch
from megatron_sapo.parallel.layout import ParallelLayout

if TYPE_CHECKING:
    from megatron_sapo.config import Config

GIB = 1 << 30
DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_HEADROOM_GIB = 5.0
DEFAULT_GPUS_PER_NODE = 8
BF16, FP32 = 2, 4
PARAM_BYTES = {"bfloat16": BF16, "float32": FP32}
# Mirrors the OptimizerConfig built in actor.py: use_precision_aware_optimizer is on with optimizer_cpu_offload.
PRECISION_AWARE_OPTIMIZER = True
# Folder next to a recipe's config.yaml that holds the model's HF config.json (recipes/qwen3_30b_a3b/hf_config).
RECIPE_HF_CONFIG_DIR = "hf_config"


# --- what the plan reads from a config ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """The config values the memory plan depends on (see :meth:`from_config`)."""

    layout: ParallelLayout
    world_size: int
    dtype: str = "bfloat16"
    max_tokens_per_micro_batch: int = 8192
    max_sequence_length: int = 2048  # data.max_prompt_length + data.max_response_length
    recompute_granularity: str | None = None
    recompute_num_layers: int | None = None
    param_offload: bool = False
    grad_offload: bool = False
    optimizer_offload: bool = False
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 0.0
    use_kl_loss: bool = False
    entropy_gradient: bool = False  # actor.entropy_coeff != 0
    flash_attention: bool = True  # Transformer Engine's fused attention (use_transformer_engine null or true)
    rollout_backend: str = "sglang"
    rollout_mem_fraction: float = 0.0  # of the GPU, held by colocated SGLang servers while they generate
    rollout_memory_saver: bool = True  # the servers release that memory while the trainer trains
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    log_prob_chunk_size: int | None = 4096  # actor.log_prob_chunk_size (null: the whole micro-batch)
    precision_aware_optimizer: bool = PRECISION_AWARE_OPTIMIZER
    critic: bool = False  # algorithm.adv_estimator=gae

    @classmethod
    def from_config(cls, config: "Config", world_size: int, *, gpus_per_node: int | None = None) -> "PlanSettings":
        actor, megatron, rollout = config.actor, config.actor.megatron, config.rollout
        # Only launched SGLang servers share the trainer's GPUs: the embedded server runs on the CPU and external
        # servers own other GPUs.
        colocated = rollout.backend == "sglang"
        return cls(
            layout=megatron.layout,
            world_size=world_size,
            dtype=config.model.dtype,
            max_tokens_per_micro_batch=actor.max_tokens_per_micro_batch,
            log_prob_chunk_size=actor.log_prob_chunk_size,
            max_sequence_length=config.data.max_prompt_length + config.data.max_response_length,
            recompute_granularity=megatron.recompute_granularity,
            recompute_num_layers=megatron.recompute_num_layers,
            param_offload=megatron.param_offload,
            grad_offload=megatron.grad_offload,
            optimizer_offload=megatron.optimizer_offload,
            optimizer_cpu_offload=megatron.optimizer_cpu_offload,
            optimizer_offload_fraction=megatron.optimizer_offload_fraction,
            use_kl_loss=actor.use_kl_loss,
            critic=config.use_critic,
            entropy_gradient=actor.entropy_coeff != 0,
            # null means "TE when importable on CUDA"; the GPUs we plan for have it (NGC containers do).
            flash_attention=megatron.use_transformer_engine is not False,
            rollout_backend=rollout.backend,
            rollout_mem_fraction=rollout.mem_fraction_static if colocated else 0.0,
            rollout_memory_saver=rollout.enable_memory_saver,
            gpus_per_node=gpus_per_node or min(world_size, DEFAULT_GPUS_PER_NODE),
        )


# --- parameters -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer (whole model, before any sharding), split by how they are sharded."""

    attention: int  # QKV + output projection: split by TP
    replicated: int  # input/pre-MLP norms, q/k norms, router: on every TP rank
    experts: int  # routed experts: split by EP×ETP
    dense_mlp: int  # dense (non-MoE) MLP: split by TP


def layer_params(arch: ModelArch, moe: bool) -> LayerParams:
    h, q, k = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    norms = 2 * h + (2 * arch.head_dim if arch.qk_norm else 0)
    return LayerParams(
        attention=h * (q + 2 * k) + q * h + ((q + 2 * k) if arch.qkv_bias else 0),
        replicated=norms + (arch.num_experts * h if moe else 0),
        experts=arch.num_experts * 3 * h * arch.moe_intermediate_size if moe else 0,
        dense_mlp=0 if moe else 3 * h * arch.intermediate_size,
    )


def model_parameter_count(arch: ModelArch) -> int:
    """All parameters of the model, vocab padding rows excluded (the HF count)."""
    layers = sum(sum(dataclasses.astuple(layer_params(arch, bool(moe)))) for moe in arch.moe_layer_pattern)
    return layers + (1 if arch.tie_word_embeddings else 2) * arch.vocab_size * arch.hidden_size + arch.hidden_size


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one GPU of a pipeline stage."""

    stage: int
    first_layer: int
    num_layers: int
    moe_layers: int
    dense: int  # sharded over the DP×CP group by the distributed optimizer
    expert: int  # sharded over the expert-data-parallel group
    # numel of each parameter tensor on the GPU, dense ones and (per local expert) expert ones
    dense_tensors: tuple[int, ...] = ()
    expert_tensors: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return self.dense + self.expert

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    def describe(self, pp: int) -> str:
        if pp == 1:
            return f"the only stage: layers 0-{self.num_layers - 1}, embedding and output layer"
        where = "first (embedding)" if self.stage == 0 else "last (output layer)" if self.stage == pp - 1 else "middle"
        last_layer = self.first_layer + self.num_layers - 1
        return f"stage {self.stage} of {pp}, {where}: layers {self.first_layer}-{last_layer}"


def stage_params(arch: ModelArch, layout: ParallelLayout, stage: int) -> StageParams:
    """Per-GPU parameters of pipeline stage ``stage`` (layers split evenly; validate_layout checks divisibility)."""
    per_stage = arch.num_layers // layout.pp
    pattern = arch.moe_layer_pattern[stage * per_stage : (stage + 1) * per_stage]
    h, t, d = arch.hidden_size, layout.tp, arch.head_dim
    q, k = arch.num_attention_heads * d, arch.num_key_value_heads * d
    dense: list[int] = []
    expert: list[int] = []
    for moe in pattern:
        # input norm, QKV (and its bias), q/k norms, output projection, pre-MLP norm
        dense += [h, h * (q + 2 * k) // t, *([(q + 2 * k) // t] if arch.qkv_bias else []),
                  *([d, d] if arch.qk_norm else []), q * h // t, h]  # fmt: skip
        if moe:
            dense.append(arch.num_experts * h)  # router
            f = arch.moe_intermediate_size // layout.etp
            expert += [2 * f * h, f * h] * (arch.num_experts // layout.ep)  # fc1 (gate, up) and fc2 per expert
        else:
            dense += [2 * arch.intermediate_size * h // t, arch.intermediate_size * h // t]
    embedding = arch.padded_vocab_size * h // t
    if stage == 0:
        dense.append(embedding)
    if stage == layout.pp - 1:
        dense.append(h)  # final norm
        if not arch.tie_word_embeddings or layout.pp > 1:
            dense.append(embedding)  # the output layer (tied: the last stage's copy of the embedding)
    return StageParams(
        stage=stage,
        first_layer=stage * per_stage,
        num_layers=per_stage,
        moe_layers=sum(pattern),
        dense=sum(dense),
        expert=sum(expert),
        dense_tensors=tuple(dense),
        expert_tensors=tuple(expert),
    )


def critic_stage_params(arch: ModelArch, layout: ParallelLayout, stage: int) -> StageParams:
    """The critic's: the actor's trunk, untied, with the last stage's output layer replaced by the value head
    (``h`` parameters, replicated over TP)."""
    params = stage_params(dataclasses.replace(arch, tie_word_embeddings=False), layout, stage)
    if stage != layout.pp - 1:
        return params
    dense = params.dense_tensors[:-1] + (arch.hidden_size,)
    return dataclasses.replace(params, dense=sum(dense), dense_tensors=dense)


def buffer_numel(tensors: tuple[int, ...], group: int) -> int:
    """Elements of a Megatron DDP buffer holding ``tensors`` for the distributed optimizer: every parameter starts
    at a multiple of 64 elements and the (single) bucket ends at a multiple of lcm(group, 128)."""
    if not tensors:
        return 0
    end = sum(-(-n // 64) * 64 for n in tensors[:-1]) + tensors[-1]
    divisor = math.lcm(group, 128)
    return -(-end // divisor) * divisor


def planned_stages(pp: int) -> list[int]:
    """The stages that can be the heaviest: the first (embedding, most micro-batches in flight) and the last."""
    return sorted({0, pp - 1})


# --- optimizer ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerBytes:
    gpu: int
    host: int  # the hybrid CPU optimizer's fp32 params and Adam moments: pageable host memory, in both phases
    pinned: int = 0  # its fp32 gradient copies (pin_cpu_grads), each rounded up to a power of two
    startup: int = 0  # host memory megatron holds only while it builds the hybrid optimizer the second time


def shard_groups(settings: PlanSettings) -> tuple[int, int]:
    """The distributed optimizer's shard groups: DP×CP for dense params, expert-DP for expert params."""
    layout, world = settings.layout, settings.world_size
    return layout.data_parallel_size(world) * layout.cp, world // (layout.ep * layout.etp * layout.pp)


def _pinned_shard_bytes(tensors: tuple[int, ...], group: int, bytes_per: int) -> float:
    """One pinned host tensor per parameter shard, each rounded up to a power of two (torch's CachingHostAllocator).
    The distributed optimizer cuts the buffer into ``group`` equal ranges: a parameter smaller than a range lies
    in one rank's range (each rank holds ~1/group of them whole), a larger one is cut into ~1/group pieces."""
    piece = sum(tensors) / group
    return sum(pow2(bytes_per * n) / group if n <= piece else pow2(bytes_per * n // group) for n in tensors)


def optimizer_bytes(params: StageParams, settings: PlanSettings) -> OptimizerBytes:
    dense_group, expert_group = shard_groups(settings)
    shard = params.dense / dense_group + params.expert / expert_group
    on_host = settings.optimizer_offload_fraction if settings.optimizer_cpu_offload else 0.0
    main_params = settings.dtype != "float32"  # fp32 models update their own params: no separate main copy
    if main_params and not settings.precision_aware_optimizer:
        gpu_per_param = FP32 + 2 * FP32 * (1 - on_host)  # the DistributedOptimizer's fp32 main shard stays on GPU
    else:
        gpu_per_param = (FP32 * main_params + 2 * FP32) * (1 - on_host)
    pinned = on_host * (
        _pinned_shard_bytes(params.dense_tensors, dense_group, FP32)
        + _pinned_shard_bytes(params.expert_tensors, expert_group, FP32)
    )
    return OptimizerBytes(
        gpu=round(shard * gpu_per_param),
        host=round(shard * 3 * FP32 * on_host),  # fp32 param copy, exp_avg, exp_avg_sq (torch AdamW: pageable)
        pinned=round(pinned),
        # get_megatron_optimizer first builds it from the model's whole params (fp32 copies of the offloaded
        # fraction), then DistributedOptimizer from the shards; the actor frees the first right after.
        startup=round(FP32 * on_host * params.total),
    )


def pow2(n: float) -> int:
    return 1 << max(math.ceil(n) - 1, 0).bit_length()


def segmented_host_bytes(total: float) -> int:
    """Host buffers of the optimizer offload (``parallel/offload.py``): whole segments and a power-of-two tail."""
    from megatron_sapo.parallel.offload import SEGMENT_BYTES

    full, rest = divmod(math.ceil(total), SEGMENT_BYTES)
    return full * SEGMENT_BYTES + (pow2(rest) if rest else 0)


# --- activations ----------------------------------------------------------------------------------------------------


def attention_bytes_per_token(arch: ModelArch) -> int:
    """Kept by one attention block per sequence-parallel token ``T'`` (see the module docstring)."""
    h, q, k = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    return BF16 * (2 * h + (q + k) + (q + 2 * k) + q)


def moe_bytes_per_token(arch: ModelArch, etp: int, fused: bool = True) -> int:
    """Kept by one MoE block per ``T'`` token, routing balanced over the experts."""
    h, f, topk, experts = arch.hidden_size, arch.moe_intermediate_size, arch.num_experts_per_tok, arch.num_experts
    norm_and_router = BF16 * 2 * h + 2 * FP32 * experts
    expert_input = BF16 * h * topk * etp
    # Per routed copy (f/etp wide, etp times as many copies): the fc1 output and the probability-weighted SwiGLU
    # output (fc2's input); unfused, also the silu output and the SwiGLU output before the weighting.
    expert_hidden = BF16 * (2 * f + f + (0 if fused else 2 * f)) * topk
    return norm_and_router + expert_input + expert_hidden


def dense_mlp_bytes_per_token(arch: ModelArch, fused: bool = True) -> int:
    """Kept by one dense SwiGLU MLP block per ``T'`` token (unfused, also the silu output)."""
    return BF16 * (2 * arch.hidden_size + (3 if fused else 4) * arch.intermediate_size)


def dispatcher_bytes_per_token(arch: ModelArch, etp: int) -> int:
    """All-to-all buffers of the MoE layer being computed, per ``T'`` token (transient, one layer at a time)."""
    return BF16 * arch.hidden_size * arch.num_experts_per_tok * (2 + etp)


def core_attention_bytes(arch: ModelArch, settings: PlanSettings) -> int:
    """Unfused attention's softmax (fp32) and probabilities (bf16) of one layer and micro-batch; 0 with flash."""
    if settings.flash_attention:
        return 0
    tokens = settings.max_tokens_per_micro_batch
    longest = min(tokens, settings.max_sequence_length)  # b·s² ≤ T·s_max for micro-batches of b ≤ T/s samples
    return (FP32 + BF16) * arch.num_attention_heads // settings.layout.tp * tokens * longest


@dataclass(frozen=True)
class ActivationBytes:
    kept: int  # tensors kept for backward, all micro-batches in flight
    backward_work: int  # recomputed group + one layer's gradients + dispatcher buffers
    output: int  # output layer inputs + logits + log-prob work space (last stage only)

    @property
    def peak(self) -> int:
        return self.kept + max(self.backward_work, self.output)


def activation_bytes(arch: ModelArch, params: StageParams, settings: PlanSettings) -> ActivationBytes:
    layout = settings.layout
    tokens = settings.max_tokens_per_micro_batch
    seq_tokens = tokens / (layout.tp * layout.cp)  # T': tokens of a sequence-parallel region on one rank
    core = core_attention_bytes(arch, settings)
    fused = settings.flash_attention  # TE on GPU: the actor turns Megatron's fused kernels on
    moe = (attention_bytes_per_token(arch) + moe_bytes_per_token(arch, layout.etp, fused)) * seq_tokens + core
    dense = (attention_bytes_per_token(arch) + dense_mlp_bytes_per_token(arch, fused)) * seq_tokens + core
    dense_layers = params.num_layers - params.moe_layers
    heaviest_layer = moe if params.moe_layers else dense
    dispatcher = dispatcher_bytes_per_token(arch, layout.etp) * seq_tokens if params.moe_layers else 0

    granularity = settings.recompute_granularity
    if granularity == "full":
        group = settings.recompute_num_layers or 1
        kept_per_micro_batch = math.ceil(params.num_layers / group) * BF16 * arch.hidden_size * seq_tokens
        recomputed = min(group, params.num_layers) * heaviest_layer
    else:
        recomputed_core = core if granularity == "selective" else 0
        kept_per_micro_batch = params.moe_layers * (moe - recomputed_core) + dense_layers * (dense - recomputed_core)
        recomputed = recomputed_core
    in_flight = layout.pp - params.stage
    output = 0
    if params.stage == layout.pp - 1:
        output = output_layer_bytes(arch, settings)
    return ActivationBytes(
        kept=round(in_flight * kept_per_micro_batch),
        backward_work=round(recomputed + heaviest_layer + dispatcher),
        output=round(output),
    )


def output_layer_bytes(arch: ModelArch, settings: PlanSettings) -> float:
    """Final norm and output layer inputs, the vocab-parallel logits and the log-prob work space of one micro-batch."""
    layout = settings.layout
    tokens = settings.max_tokens_per_micro_batch / layout.cp
    vocab = arch.padded_vocab_size / layout.tp
    inputs = 2 * BF16 * arch.hidden_size * tokens / layout.tp
    logits = BF16 * tokens * vocab
    chunk = min(settings.log_prob_chunk_size or tokens, tokens) * vocab * FP32
    forward = 2 * chunk  # shifted logits and their exp (training computes the entropy)
    backward = chunk * (2 if settings.entropy_gradient else 1)  # softmax (+ log p); the gradient reuses the logits
    # GPTModel returns logits.transpose(0, 1).contiguous(): a second copy next to the output layer's own; in
    # backward the logits gradient (in the logits' storage) comes back transposed and the output layer's backward
    # makes it contiguous (prepare_input_tensors_for_wgrad_compute): again a second copy.
    return inputs + logits + max(logits, forward, backward)


# --- the plan -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    training: int
    rollout: int
    host: int = 0  # pageable host memory
    pinned: int = 0  # pinned (page-locked) host memory


@dataclass(frozen=True)
class StagePlan:
    params: StageParams
    rows: tuple[Row, ...]
    startup_host: int = 0  # pageable host memory held only while the optimizer is built

    @property
    def training(self) -> int:
        return sum(row.training for row in self.rows)

    @property
    def rollout(self) -> int:
        return sum(row.rollout for row in self.rows)

    @property
    def host(self) -> int:
        return sum(row.host for row in self.rows)

    @property
    def pinned(self) -> int:
        return sum(row.pinned for row in self.rows)

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)


@dataclass(frozen=True)
class MemoryPlan:
    arch: ModelArch
    settings: PlanSettings
    gpu_bytes: int
    headroom_bytes: int
    stages: tuple[StagePlan, ...]

    @property
    def training(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.training)

    @property
    def rollout(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.rollout)

    @property
    def budget(self) -> int:
        return self.gpu_bytes - self.headroom_bytes

    @property
    def fits_training(self) -> bool:
        return self.training.training <= self.budget

    @property
    def fits_rollout(self) -> bool:
        return self.rollout.rollout <= self.budget

    @property
    def fits(self) -> bool:
        return self.fits_training and self.fits_rollout


PARAMS, GRADS, OPTIMIZER, REFERENCE = "params", "grads (fp32)", "optimizer", "reference policy (KL)"
CRITIC = "critic "  # the prefix of the critic's model-state rows
KEPT, ENGINE = "activations kept for backward", "rollout engine"
LAYER_WORK, OUTPUT_WORK = "peak work: layer backward", "peak work: logits + log-probs"


def model_state_rows(params: StageParams, settings: PlanSettings, prefix: str = "") -> tuple[list[Row], OptimizerBytes]:
    """Params, grads and optimizer of one trained model (the actor's, or with ``prefix`` the critic's)."""
    dense_group, expert_group = shard_groups(settings)
    dense_numel = buffer_numel(params.dense_tensors, dense_group)
    expert_numel = buffer_numel(params.expert_tensors, expert_group)
    param_bytes = PARAM_BYTES[settings.dtype] * (dense_numel + expert_numel)
    grad_bytes = FP32 * (dense_numel + expert_numel)
    optimizer = optimizer_bytes(params, settings)
    # Offloaded params go to one pinned host copy per DDP buffer (dense, expert), each rounded to a power of two;
    # the grad buffer is freed (re-zeroed on reload); the optimizer's own device tensors go to host segments.
    param_host = sum(pow2(PARAM_BYTES[settings.dtype] * n) for n in (dense_numel, expert_numel) if n)
    optimizer_host = segmented_host_bytes(optimizer.gpu) if optimizer.gpu else 0
    rows = [
        Row(f"{prefix}{PARAMS} ({settings.dtype})", param_bytes, 0 if settings.param_offload else param_bytes,
            pinned=param_host if settings.param_offload else 0),
        Row(f"{prefix}{GRADS}", grad_bytes, 0 if settings.grad_offload else grad_bytes),
        Row(f"{prefix}{OPTIMIZER}", optimizer.gpu, 0 if settings.optimizer_offload else optimizer.gpu,
            host=optimizer.host, pinned=optimizer.pinned + (optimizer_host if settings.optimizer_offload else 0)),
    ]  # fmt: skip
    return rows, optimizer


def stage_plan(arch: ModelArch, settings: PlanSettings, stage: int, gpu_bytes: int) -> StagePlan:
    params = stage_params(arch, settings.layout, stage)
    rows, optimizer = model_state_rows(params, settings)
    startup = optimizer.startup
    if settings.critic:
        critic_rows, critic_optimizer = model_state_rows(critic_stage_params(arch, settings.layout, stage), settings,
                                                         CRITIC)  # fmt: skip
        rows += critic_rows
        startup = max(startup, critic_optimizer.startup)  # built one after the other, each freed after its build
    activations = activation_bytes(arch, params, settings)
    engine = round(settings.rollout_mem_fraction * gpu_bytes)
    # On top of the kept tensors, the larger of a layer's backward and the output layer's logits and log-probs.
    work_name = OUTPUT_WORK if activations.output > activations.backward_work else LAYER_WORK
    if settings.use_kl_loss:
        rows.append(Row(REFERENCE, BF16 * params.total, BF16 * params.total))
    rows += [
        Row(KEPT, activations.kept, 0),
        Row(work_name, activations.peak - activations.kept, 0),
        Row(ENGINE, 0 if settings.rollout_memory_saver else engine, engine),
    ]
    return StagePlan(params, tuple(rows), startup)


def plan_from_settings(
    arch: ModelArch,
    settings: PlanSettings,
    *,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    headroom_gib: float = DEFAULT_HEADROOM_GIB,
) -> MemoryPlan:
    if not gpu_memory_gib > 0:
        raise InputError(f"--gpu-memory-gib={gpu_memory_gib}: must be > 0 (80 for an H100 80GB)")
    if not 0 <= headroom_gib < gpu_memory_gib:
        raise InputError(f"--headroom-gib={headroom_gib}: must be in [0, --gpu-memory-gib)")
    gpu_bytes = round(gpu_memory_gib * GIB)
    stages = tuple(stage_plan(arch, settings, s, gpu_bytes) for s in planned_stages(settings.layout.pp))
    return MemoryPlan(arch, settings, gpu_bytes, round(headroom_gib * GIB), stages)


def plan_memory(
    config: "Config",
    arch: ModelArch,
    world_size: int,
    *,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    headroom_gib: float = DEFAULT_HEADROOM_GIB,
    gpus_per_node: int | None = None,
) -> MemoryPlan:
    """The memory plan of a loaded (validated) config for ``world_size`` GPUs of ``gpu_memory_gib`` each."""
    settings = PlanSettings.from_config(config, world_size, gpus_per_node=gpus_per_node)
    return plan_from_settings(arch, settings, gpu_memory_gib=gpu_memory_gib, headroom_gib=headroom_gib)


# --- the table ------------------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(plan: MemoryPlan) -> str:
    s, arch, layout = plan.settings, plan.arch, plan.settings.layout
    world = s.world_size
    nodes = f"{world // s.gpus_per_node} node(s) × {s.gpus_per_node}" if world % s.gpus_per_node == 0 else f"{world}"
    total = model_parameter_count(arch)
    recompute = s.recompute_granularity or "none"
    if s.recompute_granularity == "full":
        recompute += f", {s.recompute_num_layers or 1} layer(s) per checkpoint"
    chunk = f"{s.log_prob_chunk_size} tokens" if s.log_prob_chunk_size else "the whole micro-batch"
    offload = [name for name, on in (("params", s.param_offload), ("grads", s.grad_offload),
                                     ("optimizer", s.optimizer_offload)) if on]  # fmt: skip
    cpu_adam = (f"{s.optimizer_offload_fraction:.0%} of the optimizer on CPU (hybrid optimizer)"
                if s.optimizer_cpu_offload and s.optimizer_offload_fraction > 0 else "optimizer on GPU")  # fmt: skip
    lines = [
        f"memory plan: {arch.hf_architecture} {_count(total)} params ({arch.num_layers} layers, "
        + (f"{arch.num_experts} experts top-{arch.num_experts_per_tok}" if arch.is_moe else "dense")
        + f"), {world} GPUs ({nodes}) of {plan.gpu_bytes / GIB:.1f} GiB",
        f"layout: TP={layout.tp} PP={layout.pp} CP={layout.cp} EP={layout.ep} ETP={layout.etp} -> "
        f"DP={layout.data_parallel_size(world)}, expert-DP={world // (layout.ep * layout.etp * layout.pp)}, "
        f"sequence parallel {'on' if layout.sequence_parallel else 'off'}",
        f"micro-batch: <= {s.max_tokens_per_micro_batch} tokens per DP rank (longest sample {s.max_sequence_length}),"
        f" recompute {recompute}, {'flash (TE)' if s.flash_attention else 'unfused'} attention, "
        f"log-prob chunk {chunk}",
        f"offload while rolling out: {', '.join(offload) or 'nothing'}; {cpu_adam}; rollout backend "
        f"{s.rollout_backend}"
        + (
            f" holding {s.rollout_mem_fraction:.2f} of each GPU"
            f"{'' if s.rollout_memory_saver else ', also while training (no memory saver)'}"
            if s.rollout_mem_fraction
            else " (no GPU memory here)"
        ),
    ]
    for stage in plan.stages:
        p = stage.params
        lines += [
            "",
            f"{p.describe(layout.pp)}; per GPU {_count(p.dense)} dense + {_count(p.expert)} expert params",
            f"  {'GiB per GPU':34s}{'training':>9s}{'rollout':>9s}{'pinned':>9s}{'pageable':>9s}",
        ]
        for row in stage.rows:
            if row.training or row.rollout or row.host or row.pinned:
                lines.append(f"  {row.name:34s}{_gib(row.training)} {_gib(row.rollout)} {_gib(row.pinned)} "
                             f"{_gib(row.host)}")  # fmt: skip
        headroom = plan.headroom_bytes
        lines.append(f"  {'headroom (CUDA ctx, NCCL, frag.)':34s}{_gib(headroom)} {_gib(headroom)}")
        lines.append(f"  {'total':34s}{_gib(stage.training + headroom)} {_gib(stage.rollout + headroom)} "
                     f"{_gib(stage.pinned)} {_gib(stage.host)}")  # fmt: skip
    heaviest = max(plan.stages, key=lambda stage: stage.host + stage.pinned)
    per_gpu = heaviest.host + heaviest.pinned
    lines += [
        "",
        f"host memory per GPU: {heaviest.pinned / GIB:.1f} GiB pinned + {heaviest.host / GIB:.1f} GiB pageable, "
        f"{per_gpu * s.gpus_per_node / GIB:.0f} GiB per node of {s.gpus_per_node} GPUs (not checked)"
        + (
            f"; {heaviest.startup_host / GIB:.1f} GiB more per GPU while the hybrid optimizer is built (megatron "
            "builds it twice)"
            if heaviest.startup_host
            else ""
        ),  # fmt: skip
    ]
    if s.optimizer_cpu_offload and s.optimizer_offload_fraction > 0:
        lines.append(
            f"CPU Adam threads: OMP_NUM_THREADS = the node's cores / {s.gpus_per_node} processes per rank (train.sh "
            "and sbatch.slurm set it; torchrun alone would set 1)"
        )
    lines += [
        _verdict("training", plan.training.training, plan),
        _verdict("rollout", plan.rollout.rollout, plan),
        f"=> {'FITS' if plan.fits else 'DOES NOT FIT'} (formulas and assumptions: megatron_sapo/plan.py docstring)",
    ]
    return "\n".join(lines)


def _verdict(phase: str, used: int, plan: MemoryPlan) -> str:
    spare = plan.budget - used
    if spare >= 0:
        return f"{phase}: fits, {spare / GIB:.1f} GiB to spare (peak {(used + plan.headroom_bytes) / GIB:.1f} GiB)"
    return (f"{phase}: does NOT fit, {-spare / GIB:.1f} GiB over (peak {(used + plan.headroom_bytes) / GIB:.1f} "
            f"of {plan.gpu_bytes / GIB:.1f} GiB)")  # fmt: skip


# --- loading a config for planning -----------------------------------------------------------------------------------


def _configured_model_path(path: str, overrides: list[str]) -> str | None:
    """``model.path`` as the YAML and overrides set it (None when unreadable: load_config reports that)."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.load(path), "model.path")
    except Exception:
        return None
    for item in overrides:
        key, _, rest = item.partition("=")
        if key in ("model.path", "actor_rollout_ref.model.path"):
            value = rest
    return value if isinstance(value, str) else None


def resolve_hf_config_dir(config_path: str, overrides: list[str], hf_config: str | None) -> str:
    """Where the model's ``config.json`` is read from: ``--hf-config``, else ``model.path`` when it has one, else
    the recipe's own ``hf_config/`` folder (so that a recipe plans on a machine without the checkpoint)."""
    if hf_config is not None:
        if not os.path.isfile(os.path.join(hf_config, "config.json")):
            raise InputError(f"--hf-config: no config.json in {hf_config}; point it at the model's HF config folder")
        return hf_config
    model_path = _configured_model_path(config_path, overrides)
    if model_path and os.path.isfile(os.path.join(model_path, "config.json")):
        return model_path
    recipe_dir = os.path.join(os.path.dirname(os.path.abspath(config_path)), RECIPE_HF_CONFIG_DIR)
    if os.path.isfile(os.path.join(recipe_dir, "config.json")):
        return recipe_dir
    if model_path and parse_hub_id(model_path):
        return resolve_model_path(model_path, config_only=True)  # the Hub's config.json, cached
    raise InputError(
        f"model.path={model_path!r} has no config.json on this machine; pass --hf-config DIR with the model's "
        "config.json (e.g. recipes/qwen3_30b_a3b/hf_config)"
    )


def load_plan_config(
    config_path: str, overrides: list[str], *, world_size: int, hf_config: str | None = None
) -> tuple["Config", ModelArch]:
    """Load and validate the config with :func:`megatron_sapo.config.load_config`, for planning on any machine.

    The plan needs neither the weights nor the prompts, so the checks that they exist are skipped and the model's
    ``config.json`` is read from :func:`resolve_hf_config_dir`. Every other rule (layout against the world size and
    the model, batch arithmetic, ranges) is checked as the trainer checks it.
    """
    from megatron_sapo.config import load_config

    if not os.path.isfile(config_path):
        raise InputError(
            f"--config: {config_path} does not exist; pass a YAML such as recipes/qwen3_30b_a3b/config.yaml"
        )
    hf_dir = resolve_hf_config_dir(config_path, overrides, hf_config)
    config = load_config(config_path, overrides, world_size=world_size, check_paths=False, hf_config_dir=hf_dir)
    return config, load_arch(hf_dir)


# --- command line ---------------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and status 2, like every other bad input
        raise InputError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m megatron_sapo.plan", description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", required=True, help="trainer YAML, e.g. recipes/qwen3_30b_a3b/config.yaml")
    parser.add_argument("--world-size", type=int, help="number of GPUs (default: nodes × gpus-per-node)")
    parser.add_argument("--nodes", type=int, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, help=f"GPUs per node (default {DEFAULT_GPUS_PER_NODE})")
    parser.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB, help="memory of one GPU")
    parser.add_argument("--headroom-gib", type=float, default=DEFAULT_HEADROOM_GIB,
                        help="reserved for CUDA contexts, NCCL buffers and fragmentation")  # fmt: skip
    parser.add_argument("--hf-config", help="folder with the model's config.json (default: model.path, else the "
                        "recipe's hf_config/)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for megatron_sapo.train")
    return parser.parse_intermixed_args(argv)


def world_and_node_size(args: argparse.Namespace) -> tuple[int, int]:
    if args.world_size is not None and args.nodes is not None:
        raise InputError("pass either --world-size or --nodes (with --gpus-per-node), not both")
    gpus_per_node = args.gpus_per_node if args.gpus_per_node is not None else DEFAULT_GPUS_PER_NODE
    if gpus_per_node < 1:
        raise InputError(f"--gpus-per-node={gpus_per_node}: must be >= 1")
    if args.world_size is not None:
        if args.world_size < 1:
            raise InputError(f"--world-size={args.world_size}: must be >= 1")
        return args.world_size, min(gpus_per_node, args.world_size)
    nodes = args.nodes if args.nodes is not None else 1
    if nodes < 1:
        raise InputError(f"--nodes={nodes}: must be >= 1")
    return nodes * gpus_per_node, gpus_per_node


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        world_size, gpus_per_node = world_and_node_size(args)
        config, arch = load_plan_config(args.config, args.overrides, world_size=world_size, hf_config=args.hf_config)
        plan = plan_memory(config, arch, world_size, gpu_memory_gib=args.gpu_memory_gib,
                           headroom_gib=args.headroom_gib, gpus_per_node=gpus_per_node)  # fmt: skip
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
