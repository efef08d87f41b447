"""The weight-mapping table's pure functions, against hand-built layouts; the providers' config.json reading."""

import subprocess
import sys

import pytest
import torch

from megatron_sapo.convert.mapping import (
    WEIGHT_RULES,
    hf_names,
    hf_shapes,
    iter_hf_params,
    match_megatron_name,
    merge_hf,
    shard,
    split_megatron,
    unshard,
)
from megatron_sapo.errors import InputError
from megatron_sapo.models import arch_from_config, load_arch

FAMILIES = ("qwen3_moe", "qwen2", "qwen3")


@pytest.fixture
def arch(tiny_hf_dir):
    return load_arch(tiny_hf_dir)


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


@pytest.mark.parametrize("family", FAMILIES)
def test_table_covers_every_hf_tensor_exactly_once(tiny_model, family):
    from safetensors import safe_open

    hf_dir = tiny_model(family)
    arch = load_arch(hf_dir)
    with safe_open(f"{hf_dir}/model.safetensors", "pt") as f:
        stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert hf_shapes(arch) == stored
    names = [n for rule, layer, expert in iter_hf_params(arch) for n in hf_names(rule, layer, expert)]
    assert len(names) == len(set(names)) == len(stored)
    scopes = {rule.scope for rule, _, _ in iter_hf_params(arch)}
    assert scopes == ({"model", "layer", "moe"} if family == "qwen3_moe" else {"model", "layer", "dense"})
    assert ("lm_head.weight" in stored) is (not arch.tie_word_embeddings)
    assert any(".bias" in n for n in stored) is arch.qkv_bias and any("q_norm" in n for n in stored) is arch.qk_norm
    assert len(WEIGHT_RULES) == 16


def test_tiny_families_exercise_every_mapping_case(tiny_model):
    archs = {family: load_arch(tiny_model(family)) for family in FAMILIES}
    assert {f: (a.qkv_bias, a.qk_norm, a.tie_word_embeddings, a.is_moe) for f, a in archs.items()} == {
        "qwen3_moe": (False, True, False, True),
        "qwen2": (True, False, True, False),
        "qwen3": (False, True, False, False),
    }
    for a in archs.values():
        assert a.num_key_value_heads < a.num_attention_heads and a.vocab_size % 128 != 0
    assert archs["qwen3"].head_dim != archs["qwen3"].hidden_size // archs["qwen3"].num_attention_heads


def test_qkv_bias_is_interleaved_like_the_weight(tiny_model):
    arch = load_arch(tiny_model("qwen2"))  # 4 heads, 2 groups, head_dim 16
    d = arch.head_dim
    q, k, v = torch.arange(4.0 * d), -torch.arange(2.0 * d) - 1, 1000 + torch.arange(2.0 * d)
    rule = match_megatron_name("decoder.layers.1.self_attention.linear_qkv.bias", arch).rule
    fused = merge_hf(rule, [q, k, v], arch)
    assert torch.equal(fused, torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d :], k[d:], v[d:]]))
    assert all(torch.equal(a, b) for a, b in zip(split_megatron(rule, fused, arch), [q, k, v]))
    assert torch.equal(shard(rule, fused, 1, 2), torch.cat([q[2 * d :], k[d:], v[d:]]))


def test_tied_output_layer_copy_is_imported_from_the_embedding_and_never_exported(tiny_model):
    tied = load_arch(tiny_model("qwen2"))
    untied = load_arch(tiny_model("qwen3"))
    copy = match_megatron_name("output_layer.weight", tied).rule
    assert copy.hf == ("model.embed_tokens.weight",) and not copy.exported
    assert match_megatron_name("output_layer.weight", untied).rule.hf == ("lm_head.weight",)
    assert match_megatron_name("decoder.layers.0.self_attention.q_layernorm.weight", tied) is None  # no qk-norm


QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584,
         "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
         "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28, "tie_word_embeddings": False}


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
         "model_type='llama' (architectures=['LlamaForCausalLM']) is not supported; megatron_sapo supports qwen2 "
         "(Qwen2ForCausalLM), qwen3 (Qwen3ForCausalLM), qwen3_moe (Qwen3MoeForCausalLM)"),
        ({"use_sliding_window": True, "max_window_layers": 20},
         "use_sliding_window=True is not supported (layers 20-27"),
        ({"layer_types": ["full_attention"] * 27 + ["sliding_attention"]}, "layer_types=['full_attention'"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling: rope type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=True is not supported"),
        ({"hidden_size": None}, "missing 'hidden_size'"),
    ],
    ids=["llama", "sliding_window", "layer_types", "yarn", "gelu", "qwen3_attention_bias", "missing_key"],
)
def test_unsupported_configs_are_refused_by_name(changes, needle):
    with pytest.raises(InputError) as error:
        arch_from_config({**QWEN2, **changes}, source="config.json")
    message = str(error.value)
    assert "\n" not in message and message.startswith("config.json: ") and needle in message, message


def test_sliding_window_off_or_beyond_the_last_layer_is_full_attention():
    arch = arch_from_config({**QWEN2, "use_sliding_window": True, "max_window_layers": 28})
    assert (arch.family, arch.qkv_bias, arch.qk_norm, arch.is_moe) == ("qwen2", True, False, False)
    assert arch.head_dim == 128 and arch.padded_vocab_size == 152064


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


def test_models_import_nothing_above_them():
    """models/ (the architecture description, providers, the Megatron builder) sits below convert/, parallel/ and
    the trainer: the mapping table imports ModelArch, never the other way round. The one module of parallel/ they
    may use is the megatron-core compatibility layer, a leaf that imports nothing of the package."""
    import ast
    import pathlib

    import megatron_sapo.models

    above = tuple(f"megatron_sapo.{name}" for name in ("convert", "parallel", "plan", "config", "trainer", "actor",
                                                       "critic", "rollout"))  # fmt: skip
    found = []
    for path in pathlib.Path(megatron_sapo.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.name}: {name}" for name in names
                      if name.startswith(above) and name != "megatron_sapo.parallel.mcore_compat"]  # fmt: skip
    compat = pathlib.Path(megatron_sapo.models.__file__).parent.parent / "parallel" / "mcore_compat.py"
    for node in ast.walk(ast.parse(compat.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"mcore_compat.py: {name}" for name in names if name.startswith("megatron_sapo")]
    assert found == []
