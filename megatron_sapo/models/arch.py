"""The one architecture description every model family fills from its HF ``config.json``.

A provider module per family (``qwen2``, ``qwen3``, ``qwen3_moe``) reads its config into :class:`ModelArch`; the
Megatron builder (:mod:`megatron_sapo.models.gpt`), the mapping table, the memory plan and the layout checks read
only these fields, never the family. This module imports nothing of the package but ``errors``, so that every layer
above (convert/, parallel/, plan) can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_sapo.errors import InputError

# Vocab rows are padded to a multiple of this. It does not depend on TP (Megatron-LM pads to 128·TP), so a
# checkpoint's embedding has the same global shape under every layout; 128 is divisible by any TP ≤ 128.
VOCAB_PADDING_MULTIPLE = 128


@dataclass(frozen=True)
class ModelArch:
    """A decoder-only GPT with RMSNorm, SwiGLU, RoPE and GQA; dense or MoE per layer."""

    family: str  # the provider's model_type, e.g. "qwen2"
    hf_architecture: str  # the transformers class a checkpoint of this family declares, e.g. "Qwen2ForCausalLM"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # of the dense MLP layers
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool  # biases on the q/k/v projections only (Qwen2); the output projection and MLP have none
    qk_norm: bool  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
    tie_word_embeddings: bool  # the output layer is the embedding matrix (no lm_head.weight in the checkpoint)
    moe_layer_pattern: tuple[int, ...]  # 1 = MoE layer, 0 = dense MLP layer; all 0 for a dense model
    # MoE fields; 0 / False for a dense model.
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.0

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layer_pattern)


class HFConfig:
    """Read access to a config.json dict that refuses with one line naming the key (both the hub spelling and
    transformers 5's, e.g. ``rope_theta`` / ``rope_parameters``)."""

    def __init__(self, config: dict[str, Any], source: str, family: str):
        self.config, self.source, self.family = config, source, family

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if self.config.get(name) is not None:
                return self.config[name]
        if default is None:
            raise InputError(f"{self.source}: missing '{names[0]}'; the config is not a complete {self.family} config")
        return default

    def refuse(self, key: str, unsupported: bool, why: str) -> None:
        if unsupported:
            raise InputError(f"{self.source}: {key}={self.config.get(key)!r} is not supported ({why})")

    def rope_theta(self) -> float:
        rope = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        key = "rope_parameters" if "rope_parameters" in self.config else "rope_scaling"
        if rope_type != "default":
            raise InputError(f"{self.source}: {key}: rope type {rope_type!r} is not supported; only default RoPE is")
        return float(rope.get("rope_theta", self.config.get("rope_theta", 10000.0)))

    def head_dim(self) -> int:
        heads = self.get("num_attention_heads")
        return self.get("head_dim", default=self.get("hidden_size") // heads)

    def full_attention(self) -> None:
        """Refuse sliding-window layers as transformers decides them: ``layer_types`` when given, else
        ``use_sliding_window`` makes layers ``max_window_layers`` and above sliding."""
        layers = self.get("num_hidden_layers")
        layer_types = self.config.get("layer_types")
        if layer_types is not None:
            self.refuse("layer_types", any(t != "full_attention" for t in layer_types),
                        "only full attention is; use full_attention for every layer")  # fmt: skip
        elif self.config.get("use_sliding_window"):
            first = self.config.get("max_window_layers", 28)
            self.refuse("use_sliding_window", first < layers,
                        f"layers {first}-{layers - 1} would use sliding-window attention; set it to false")  # fmt: skip

    def dense_fields(self) -> dict[str, Any]:
        """The fields every family reads the same way."""
        layers = self.get("num_hidden_layers")
        heads = self.get("num_attention_heads")
        self.refuse("hidden_act", self.config.get("hidden_act", "silu") != "silu", "only silu (SwiGLU) is")
        self.full_attention()
        return dict(
            family=self.family,
            vocab_size=self.get("vocab_size"),
            hidden_size=self.get("hidden_size"),
            num_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=self.get("num_key_value_heads", default=heads),
            head_dim=self.head_dim(),
            intermediate_size=self.get("intermediate_size"),
            rms_norm_eps=self.get("rms_norm_eps", default=1e-6),
            rope_theta=self.rope_theta(),
            max_position_embeddings=self.get("max_position_embeddings"),
            tie_word_embeddings=bool(self.config.get("tie_word_embeddings", False)),
            moe_layer_pattern=(0,) * layers,
        )
