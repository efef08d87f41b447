"""The weight-mapping table's pure functions, against hand-built layouts."""

import subprocess
import sys

import pytest
import torch

from megatron_sapo.convert.mapping import (
    QWEN3_MOE_RULES,
    hf_names,
    hf_shapes,
    iter_hf_params,
    match_megatron_name,
    merge_hf,
    shard,
    split_megatron,
    unshard,
)
from megatron_sapo.models.qwen3_moe import Qwen3MoeArch


@pytest.fixture
def arch(tiny_hf_dir):
    return Qwen3MoeArch.from_hf_dir(tiny_hf_dir)


def rule_for(name):
    return match_megatron_name(name).rule


def test_qkv_is_interleaved_per_query_group(arch):
    d, h = arch.head_dim, arch.hidden_size  # 4 heads, 2 groups → 2 q heads per group
    q = torch.arange(4 * d * h, dtype=torch.float32).reshape(4 * d, h)
    k = -torch.arange(2 * d * h, dtype=torch.float32).reshape(2 * d, h) - 1
    v = torch.full((2 * d, h), 0.5) + torch.arange(2 * d).unsqueeze(1)
    rule = rule_for("decoder.layers.0.self_attention.linear_qkv.weight")
    fused = merge_hf(rule, [q, k, v], arch)
    expected = torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d :], k[d:], v[d:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_megatron(rule, fused, arch), [q, k, v]))
    # A contiguous TP=2 split gives each rank one whole query group.
    assert torch.equal(shard(rule, fused, 1, 2), torch.cat([q[2 * d :], k[d:], v[d:]]))


def test_swiglu_fc1_shards_gate_and_up_separately(arch):
    rule = rule_for("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight")
    gate, up = torch.randn(32, 64), torch.randn(32, 64)
    fused = merge_hf(rule, [gate, up], arch)
    shards = [shard(rule, fused, r, 2) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[16:], up[16:]]))
    assert torch.equal(unshard(rule, shards), fused)


def test_vocab_rows_padded_on_import_and_trimmed_on_export(arch):
    rule = rule_for("output_layer.weight")
    weight = torch.randn(arch.vocab_size, arch.hidden_size)
    padded = merge_hf(rule, [weight], arch)
    assert padded.shape[0] == arch.padded_vocab_size == 256
    assert torch.equal(padded[arch.vocab_size :], torch.zeros(6, arch.hidden_size))
    assert torch.equal(split_megatron(rule, padded, arch)[0], weight)


@pytest.mark.parametrize(
    "name, layer, expert",
    [
        ("decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight", 3, 1),
        ("decoder.layers.2.mlp.experts.linear_fc1.weight7", 2, 7),  # TE grouped GEMM
        ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", 0, None),  # TE fused input norm
        ("decoder.final_layernorm.weight", None, None),
    ],
)
def test_megatron_names_match_their_rule(name, layer, expert):
    matched = match_megatron_name(name)
    assert (matched.layer, matched.expert) == (layer, expert)


def test_table_covers_every_hf_tensor_exactly_once(arch, tiny_hf_dir):
    from safetensors import safe_open

    with safe_open(f"{tiny_hf_dir}/model.safetensors", "pt") as f:
        stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert hf_shapes(arch) == stored
    names = [n for rule, layer, expert in iter_hf_params(arch) for n in hf_names(rule, layer, expert)]
    assert len(names) == len(set(names)) == len(stored)
    assert {rule.scope for rule, _, _ in iter_hf_params(arch)} == {"model", "layer", "moe"}
    assert len(QWEN3_MOE_RULES) == 14


def test_cpu_device_layer_maps_cuda_to_cpu():
    code = (
        "import torch\n"
        "from megatron_sapo.parallel.cpu_device import enable_cpu_device_layer\n"
        "assert enable_cpu_device_layer()\n"
        "x = torch.empty(3, device='cuda'); y = torch.zeros(2, device=torch.cuda.current_device())\n"
        "assert x.device.type == y.device.type == 'cpu' and x.cuda() is x\n"
        "assert torch.ones(2).type() == 'torch.cuda.FloatTensor' and x.to('cuda:0').device.type == 'cpu'\n"
        "torch.cuda.synchronize(); print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
