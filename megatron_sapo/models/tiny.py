"""Tiny random HF checkpoints of every supported family, made with transformers, for tests and the CPU demo.

The defaults exercise every mapping case of the real models: GQA with fewer query groups than heads, a vocabulary
(250) that is not a multiple of Megatron's vocab padding, and per family

- ``qwen3_moe``: qk-norm, ``head_dim`` 24 ≠ hidden/heads, top-2 of 4 experts with ``norm_topk_prob``, untied;
- ``qwen2``: q/k/v biases and tied embeddings (as Qwen2.5-0.5B-3B), ``head_dim`` = hidden/heads (Qwen2 configs do
  not set it);
- ``qwen3``: qk-norm, ``head_dim`` 24 ≠ hidden/heads, untied (as Qwen3-8B and up).

Norm weights and biases are drawn at random (HF initialises them to ones and zeros), so that a mapping mistake in
either shows in the logits.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

FAMILIES = ("qwen3_moe", "qwen2", "qwen3")


@dataclass
class TinySizes:
    vocab_size: int = 250
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 24
    intermediate_size: int = 128  # dense MLP layers
    num_experts: int = 4  # MoE families only
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.05
    tokenizer_vocab_size: int = 250


FAMILY_DEFAULTS = {
    "qwen3_moe": dict(intermediate_size=256),
    "qwen2": dict(head_dim=16, tie_word_embeddings=True),
    "qwen3": dict(),
}


def tiny_sizes(family: str, **overrides) -> TinySizes:
    """The family's default tiny sizes, with ``overrides``."""
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"family {family!r}: use one of {', '.join(FAMILIES)}")
    return TinySizes(**{**FAMILY_DEFAULTS[family], **overrides})


def _hf_config(family: str, sizes: TinySizes, tokenizer):
    from transformers import CONFIG_MAPPING

    fields = dict(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": sizes.rope_theta},
        rms_norm_eps=sizes.rms_norm_eps,
        initializer_range=sizes.initializer_range,
        tie_word_embeddings=sizes.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family != "qwen2" or sizes.head_dim != sizes.hidden_size // sizes.num_attention_heads:
        fields["head_dim"] = sizes.head_dim
    if family == "qwen3_moe":
        fields.update(
            moe_intermediate_size=sizes.moe_intermediate_size,
            num_experts=sizes.num_experts,
            num_experts_per_tok=sizes.num_experts_per_tok,
            norm_topk_prob=True,
        )
    config = CONFIG_MAPPING[family](**fields)
    config.architectures = [{"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM"}[family]]  # fmt: skip
    return config


def make_tiny_model(out_dir: str, family: str = "qwen3_moe", sizes: TinySizes | None = None, seed: int = 0) -> str:
    """Write a random model of ``family`` (safetensors + config) and a sentencepiece tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from megatron_sapo.data.tokenizer import SentencePieceTokenizer, train_tiny_tokenizer

    sizes = sizes or tiny_sizes(family)
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"family {family!r}: use one of {', '.join(FAMILIES)}")
    if sizes.tokenizer_vocab_size > sizes.vocab_size:
        raise ValueError("tokenizer_vocab_size must not exceed vocab_size")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = SentencePieceTokenizer(train_tiny_tokenizer(out_dir, sizes.tokenizer_vocab_size, seed))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(family, sizes, tokenizer)).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    model.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tiny_sizes.json"), "w") as f:
        json.dump({"family": family, **asdict(sizes)}, f, indent=1)
    return out_dir
