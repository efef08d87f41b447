"""Any :class:`ModelArch` as a Megatron-Core ``GPTModel``: ``TransformerConfig``, layer specs, one model per stage.

Family-agnostic: everything that decides numerics comes from the architecture's fields and is set explicitly so
that the Megatron model computes what transformers computes: RMSNorm with the HF eps, qk-norm when ``qk_norm``, q/k/v
biases when ``qkv_bias`` (no other linear has one), SwiGLU, RoPE base, ``kv_channels=head_dim``, GQA, the output
layer tied to the embedding when ``tie_word_embeddings`` (with PP > 1 the last stage holds a copy that megatron
initialises from the first stage's, all-reduces the gradients of over the embedding group, and checkpoints as a
replica of the embedding), and for MoE layers a softmax router whose top-k probabilities are renormalised when
``norm_topk_prob`` (⇔ Megatron's ``moe_router_pre_softmax=False``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_sapo.models.arch import ModelArch
from megatron_sapo.parallel.mcore_compat import cuda_graphs_off, quiet_known_notices


@dataclass
class ModelOptions:
    """Training-side model settings that are not part of the architecture."""

    params_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    moe_aux_loss_coeff: float = 0.0
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False  # TEGroupedMLP with Transformer Engine; SequentialMLP otherwise
    recompute_granularity: str | None = None  # None | "selective" | "full"
    recompute_num_layers: int | None = None
    use_transformer_engine: bool | None = None  # None: use TE when importable on CUDA
    # Megatron's fused kernels (SwiGLU, RoPE, MoE permutation, weight-gradient accumulation); they need CUDA and
    # Transformer Engine (the actor turns them on when both are there), the last one also apex's extension.
    fused_kernels: bool = False
    # False: parameters are allocated on the host (or under a ``torch.device("meta")`` context) and never
    # initialised, for conversion, where a checkpoint overwrites every weight anyway.
    init_weights: bool = True
    # Each router gets megatron-core's RouterReplay (record / replay its top-k); see models/routing_replay.py.
    moe_enable_routing_replay: bool = False


def transformer_engine_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def gradient_accumulation_fusion_available() -> bool:
    """megatron-core's output layer (``ColumnParallelLinear``) fuses the weight-gradient accumulation only with
    apex's ``fused_weight_gradient_mlp_cuda`` and refuses the flag without it, even when TE is there."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(arch: ModelArch, options: ModelOptions | None = None, **parallel: int):
    """The Megatron ``TransformerConfig`` for ``arch``; ``parallel`` holds the ``*_model_parallel_size`` values."""
    from megatron.core.transformer import TransformerConfig

    options = options or ModelOptions()
    moe = any(arch.moe_layer_pattern)
    bf16 = options.params_dtype == torch.bfloat16
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels need CUDA/apex/TE; on CPU and in the reference comparisons we use the plain paths. The
        # fused SwiGLU also keeps less for backward (its input, not the silu output), and the fused weight-gradient
        # accumulation adds each micro-batch's gradient to the fp32 buffer without rounding it to bf16 first.
        bias_activation_fusion=options.fused_kernels,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=options.fused_kernels,
        gradient_accumulation_fusion=options.fused_kernels and gradient_accumulation_fusion_available(),
        persist_layer_norm=False,
        params_dtype=options.params_dtype,
        bf16=bf16,
        fp16=options.params_dtype == torch.float16,
        pipeline_dtype=options.params_dtype,
        sequence_parallel=options.sequence_parallel,
        recompute_granularity=options.recompute_granularity,
        recompute_method="uniform" if options.recompute_granularity == "full" else None,
        recompute_num_layers=(options.recompute_num_layers or 1) if options.recompute_granularity == "full" else None,
        variable_seq_lengths=True,
        # CPU initialisation draws each full weight from one generator and then slices it, so a random init is
        # the same model under every layout; on GPU the weights are initialised in place.
        # (perform_initialization stays on even when a checkpoint overwrites the weights: megatron-core 0.16
        # marks tensor-parallel weights as such only inside its initialisers, and without those marks the
        # gradient norm counts TP shards as duplicates.)
        use_cpu_initialization=not torch.cuda.is_available() or not options.init_weights,
        perform_initialization=options.init_weights,
        **cuda_graphs_off(),
        # megatron-core 0.16 refuses its default dispatcher ("allgather") with variable sequence lengths even for
        # a model without MoE layers.
        moe_token_dispatcher_type=options.moe_token_dispatcher_type if moe else "alltoall",
        **parallel,
    )
    if moe:
        fields.update(
            num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_intermediate_size,
            moe_router_topk=arch.num_experts_per_tok,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss" if options.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=options.moe_aux_loss_coeff,
            moe_grouped_gemm=options.moe_grouped_gemm,
            moe_permute_fusion=options.fused_kernels,
            moe_layer_freq=list(arch.moe_layer_pattern),
            moe_enable_routing_replay=options.moe_enable_routing_replay,
        )
    return TransformerConfig(**fields)


def decoder_block_spec(config, use_transformer_engine: bool, vp_stage: int | None = None, pp_rank: int | None = None):
    """The layer specs of this pipeline stage: TE's spec, or the local spec with :class:`RMSNorm` norms."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_sapo.models.norm import QKRMSNorm, RMSNorm

    if use_transformer_engine:
        return get_gpt_decoder_block_spec(config, True, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank)

    def local_layer(num_experts):
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts, qk_layernorm=config.qk_layernorm, normalization="RMSNorm"
        )
        attention = spec.submodules.self_attention
        if config.qk_layernorm:
            attention = dataclasses.replace(
                attention,
                submodules=dataclasses.replace(attention.submodules, q_layernorm=QKRMSNorm, k_layernorm=QKRMSNorm),
            )
        keys_map = dict(spec.submodules.sharded_state_dict_keys_map)
        if num_experts:
            # TE's MoE layers keep a separate `pre_mlp_layernorm` (there is no fused fc1 to fold it into), so
            # the local spec must not rename it to `mlp.linear_fc1.layer_norm_weight` either: then both specs
            # write the same checkpoint keys.
            keys_map.pop("pre_mlp_layernorm.", None)
        submodules = dataclasses.replace(
            spec.submodules,
            input_layernorm=RMSNorm,
            pre_mlp_layernorm=RMSNorm,
            self_attention=attention,
            sharded_state_dict_keys_map=keys_map,
        )
        return dataclasses.replace(spec, submodules=submodules)

    pattern = config.moe_layer_freq if config.num_moe_experts else [0] * config.num_layers
    moe_layer, dense_layer = local_layer(config.num_moe_experts), local_layer(None)
    layer_specs = [moe_layer if is_moe else dense_layer for is_moe in pattern]
    if config.pipeline_model_parallel_layout is not None:
        ids = config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank
        )
        local_specs = [layer_specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local_specs = layer_specs[offset : offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)]
    return TransformerBlockSubmodules(layer_specs=local_specs, layer_norm=RMSNorm)


def build_gpt_model(
    arch: ModelArch,
    config,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    use_transformer_engine: bool | None = None,
):
    """One pipeline stage of ``arch`` as a ``GPTModel`` producing vocab-parallel logits."""
    from megatron.core.models.gpt import GPTModel

    quiet_known_notices()
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_usable()
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, use_transformer_engine, vp_stage=vp_stage),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
        vp_stage=vp_stage,
    )


def build_model(arch: ModelArch, layout, options: ModelOptions | None = None) -> list:
    """This rank's model chunks (one per virtual stage; we use one) for ``layout``, after parallel init."""
    from megatron.core import parallel_state as ps

    options = dataclasses.replace(options or ModelOptions(), sequence_parallel=layout.sequence_parallel)
    config = transformer_config(arch, options, **layout.megatron_kwargs())
    model = build_gpt_model(
        arch,
        config,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        use_transformer_engine=options.use_transformer_engine,
    )
    return [model]
