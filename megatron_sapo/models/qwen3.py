"""Qwen3 dense (``model_type`` "qwen3", ``Qwen3ForCausalLM``, 0.6B-32B): its config.json → ModelArch.

Dense SwiGLU layers with qk-norm (RMSNorm over ``head_dim``, before RoPE) and no biases; ``head_dim`` is its own
field (128 where hidden/heads differs, e.g. Qwen3-0.6B: hidden 1024, 16 heads). The small sizes (0.6B-4B) tie the
output layer to the embedding. ``attention_bias=true`` would put biases on q/k/v *and* o_proj (transformers'
``Qwen3Attention``), which Megatron only offers together with MLP biases: refused, as is sliding-window attention.
"""

from __future__ import annotations

from typing import Any

from megatron_sapo.models.arch import HFConfig, ModelArch

MODEL_TYPE = "qwen3"
HF_ARCHITECTURE = "Qwen3ForCausalLM"


def arch_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArch:
    hf = HFConfig(config, source, MODEL_TYPE)
    hf.refuse("attention_bias", bool(config.get("attention_bias")),
              "it adds an o_proj bias Megatron cannot add alone; no published Qwen3 sets it")  # fmt: skip
    return ModelArch(**hf.dense_fields(), hf_architecture=HF_ARCHITECTURE, qkv_bias=False, qk_norm=True)
