"""Qwen2 and Qwen2.5 (``model_type`` "qwen2", ``Qwen2ForCausalLM``): their config.json → ModelArch.

Dense SwiGLU layers; q/k/v projections carry biases (transformers' ``Qwen2Attention``: ``bias=True`` on q/k/v, none on
o_proj or the MLP), no qk-norm; the small sizes (0.5B-3B) tie the output layer to the embedding. ``head_dim`` is read
when a config sets it (transformers and SGLang both honour it), else hidden/heads. Sliding-window layers (transformers:
``use_sliding_window`` makes layers ``max_window_layers`` and above sliding; every published Qwen2.5 turns it off)
are refused.
"""

from __future__ import annotations

from typing import Any

from megatron_sapo.models.arch import HFConfig, ModelArch

MODEL_TYPE = "qwen2"
HF_ARCHITECTURE = "Qwen2ForCausalLM"


def arch_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArch:
    hf = HFConfig(config, source, MODEL_TYPE)
    return ModelArch(**hf.dense_fields(), hf_architecture=HF_ARCHITECTURE, qkv_bias=True, qk_norm=False)
