"""Tiny random Qwen3-MoE checkpoints, made with transformers, for tests and the CPU demo.

The defaults exercise every mapping case of the real model: GQA with fewer query groups than heads, a
``head_dim`` different from hidden/heads, qk-norm, top-2 of 4 experts with ``norm_topk_prob``, untied
embeddings, and a vocabulary (250) that is not a multiple of Megatron's vocab padding.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch


@dataclass
class TinyQwen3MoeSizes:
    vocab_size: int = 250
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 24
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.05
    tokenizer_vocab_size: int = 250


def make_tiny_qwen3_moe(out_dir: str, sizes: TinyQwen3MoeSizes | None = None, seed: int = 0) -> str:
    """Write a random ``Qwen3MoeForCausalLM`` (safetensors + config) and a sentencepiece tokenizer to ``out_dir``."""
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_sapo.data.tokenizer import SentencePieceTokenizer, train_tiny_tokenizer

    sizes = sizes or TinyQwen3MoeSizes()
    if sizes.tokenizer_vocab_size > sizes.vocab_size:
        raise ValueError("tokenizer_vocab_size must not exceed vocab_size")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = SentencePieceTokenizer(train_tiny_tokenizer(out_dir, sizes.tokenizer_vocab_size, seed))
    config = Qwen3MoeConfig(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=4 * sizes.hidden_size,
        moe_intermediate_size=sizes.moe_intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        head_dim=sizes.head_dim,
        num_experts=sizes.num_experts,
        num_experts_per_tok=sizes.num_experts_per_tok,
        norm_topk_prob=True,
        max_position_embeddings=sizes.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": sizes.rope_theta},
        rms_norm_eps=sizes.rms_norm_eps,
        initializer_range=sizes.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen3MoeForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    # HF initialises norms to ones; random norms make the norm mapping observable in the logits tests.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tiny_sizes.json"), "w") as f:
        json.dump(asdict(sizes), f, indent=1)
    return out_dir
