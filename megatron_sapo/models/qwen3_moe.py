"""Qwen3-MoE (``model_type`` "qwen3_moe", ``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B): its config.json → ModelArch.

Qwen3's attention (qk-norm, no biases) with a softmax router whose top-k probabilities are renormalised when
``norm_topk_prob`` (⇔ Megatron's ``moe_router_pre_softmax=False``: softmax over the top-k logits equals the
renormalised top-k probabilities). Layers in ``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, are dense
MLPs. Both the hub spelling (``num_experts``, ``rope_theta``) and transformers 5's (``num_local_experts``,
``rope_parameters``) are read.
"""

from __future__ import annotations

from typing import Any

from megatron_sapo.models.arch import HFConfig, ModelArch

MODEL_TYPE = "qwen3_moe"
HF_ARCHITECTURE = "Qwen3MoeForCausalLM"


def arch_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArch:
    hf = HFConfig(config, source, MODEL_TYPE)
    # transformers puts the bias on o_proj too, which Megatron can only add with every linear's bias.
    hf.refuse("attention_bias", bool(config.get("attention_bias")), "Qwen3-MoE checkpoints have no attention biases")
    # Qwen3-MoE's attention slides on every layer when this is on (no max_window_layers there).
    hf.refuse("use_sliding_window", bool(config.get("use_sliding_window")), "only full attention is; set it to false")
    fields = hf.dense_fields()
    num_layers, num_experts = fields["num_layers"], hf.get("num_experts", "num_local_experts")
    mlp_only = set(config.get("mlp_only_layers") or [])
    sparse_step = config.get("decoder_sparse_step") or 1
    pattern = tuple(
        int(i not in mlp_only and num_experts > 0 and (i + 1) % sparse_step == 0) for i in range(num_layers)
    )
    fields.update(moe_layer_pattern=pattern)
    return ModelArch(
        **fields,
        hf_architecture=HF_ARCHITECTURE,
        qkv_bias=False,
        qk_norm=True,
        moe_intermediate_size=hf.get("moe_intermediate_size"),
        num_experts=num_experts,
        num_experts_per_tok=hf.get("num_experts_per_tok"),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.0),
    )
