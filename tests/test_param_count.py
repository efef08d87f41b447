"""Qwen3-30B-A3B built by the provider on the meta device has the published parameter counts."""

import torch
from torchrun import torchrun

RECIPE_HF_CONFIG = "recipes/qwen3_30b_a3b/hf_config"


def transformers_counts(hf_dir):
    """Independent count: transformers' own Qwen3-MoE module on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return total, total - experts + experts * config.num_experts_per_tok // config.num_experts


def test_qwen3_30b_a3b_parameter_counts():
    result = torchrun("param_count.py", "--hf-dir", RECIPE_HF_CONFIG, nproc=1)
    assert result["devices"] == ["meta"]
    assert result["arch"]["head_dim"] == 128 and result["arch"]["hidden_size"] == 2048  # head_dim ≠ hidden/heads
    total, active = result["total"], result["active"]
    assert (total, active) == transformers_counts(RECIPE_HF_CONFIG)
    # Published: "30.5B in total and 3.3B activated". Qwen rounds down to one decimal (the same convention gives
    # 22.19B → "22B" for Qwen3-235B-A22B); our exact counts are 30.53B and 3.35B.
    assert abs(total - 30.5e9) / 30.5e9 < 0.01
    assert 3.3e9 <= active < 3.4e9
