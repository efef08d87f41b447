"""The memory plan: the Qwen3-30B-A3B recipes fit 80 GB H100s, bad layouts do not, and the numbers are the formulas'."""

import dataclasses
import json
import os

import pytest

from megatron_sapo import plan
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.layout import ParallelLayout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "qwen3_30b_a3b")
CONFIG = os.path.join(RECIPE, "config.yaml")
MULTINODE = os.path.join(RECIPE, "config_multinode.yaml")
HF_CONFIG = os.path.join(RECIPE, "hf_config")
GIB = 1 << 30


@pytest.fixture(scope="module")
def recipe():
    """The single-node recipe as the plan loads it (model.path and data files are placeholders on this machine)."""
    return plan.load_plan_config(CONFIG, [], world_size=8)


def test_single_node_recipe_fits_8x_h100_80gb(recipe, capsys):
    config, arch = recipe
    memory = plan.plan_memory(config, arch, 8, gpu_memory_gib=80)
    assert memory.fits_training and memory.fits_rollout
    assert memory.training.training + memory.headroom_bytes <= 80 * GIB
    assert memory.headroom_bytes == 5 * GIB
    # The CLI agrees, prints the table, and exits 0.
    assert plan.main(["--config", CONFIG, "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "TP=2 PP=1 CP=1 EP=8 ETP=1 -> DP=4, expert-DP=1" in out and "=> FITS" in out


def test_multinode_recipe_fits_4_nodes(capsys):
    assert plan.main(["--config", MULTINODE, "--nodes", "4", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "32 GPUs" in out and "expert-DP=4" in out and "=> FITS" in out


def test_bad_layout_does_not_fit_and_exits_1(recipe, capsys):
    # No recompute: every layer keeps ~1 GiB of activations per micro-batch.
    overrides = ["actor.megatron.recompute_granularity=null"]
    assert plan.main(["--config", CONFIG, "--world-size", "8", *overrides]) == 1
    out = capsys.readouterr().out
    assert "training: does NOT fit" in out and "=> DOES NOT FIT" in out
    # Nor does EP 4 with the experts' Adam state on the GPU (twice the experts per GPU, expert-DP 2).
    overrides = ["actor.megatron.expert_model_parallel_size=4", "actor.megatron.optimizer_cpu_offload=false"]
    config, arch = plan.load_plan_config(CONFIG, overrides, world_size=8)
    assert not plan.plan_memory(config, arch, 8).fits_training
    # Without offload the trainer's state and SGLang's 70% do not fit together while rolling out.
    overrides = [f"actor.megatron.{name}_offload=false" for name in ("param", "grad", "optimizer")]
    config, arch = plan.load_plan_config(CONFIG, overrides, world_size=8)
    memory = plan.plan_memory(config, arch, 8)
    assert memory.fits_training and not memory.fits_rollout and not memory.fits


@pytest.mark.parametrize("argv, message", [
    (["--world-size", "6"], "does not divide the world size 6"),
    (["--world-size", "8", "--nodes", "1"], "either --world-size or --nodes"),
    (["--world-size", "24", "actor.megatron.tensor_model_parallel_size=3"], "does not divide num_attention_heads"),
    (["--world-size", "8", "actor.no_such_key=1"], "unknown key"),
    (["--world-size", "8", "--gpu-memory-gib", "0"], "--gpu-memory-gib"),
    (["--world-size", "8", "--hf-config", "/nonexistent"], "--hf-config"),
])  # fmt: skip
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert plan.main(["--config", CONFIG, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err


def test_missing_config_exits_2(capsys):
    assert plan.main(["--config", "/nonexistent/config.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- parameter bytes, by hand from config.json ----------------------------------------------------------------------


def hand_param_bytes(tp: int, ep: int, etp: int = 1) -> int:
    """bf16 bytes of the parameters on one GPU (PP=1), written out from the HF config without the plan's helpers."""
    with open(os.path.join(HF_CONFIG, "config.json")) as f:
        c = json.load(f)
    h, layers, experts = c["hidden_size"], c["num_hidden_layers"], c["num_experts"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    vocab = c["vocab_size"]  # 151936 is already a multiple of 128: no padding rows
    assert vocab % 128 == 0
    embedding_and_output = 2 * vocab * h
    attention = layers * (h * q + 2 * h * kv + q * h)  # q, k, v and o projections
    norms_and_router = layers * (2 * h + 2 * c["head_dim"] + experts * h) + h  # + final norm
    routed_experts = layers * experts * 3 * h * c["moe_intermediate_size"]
    per_gpu = (embedding_and_output + attention) // tp + norms_and_router + routed_experts // (ep * etp)
    return 2 * per_gpu


@pytest.mark.parametrize("tp, ep", [(1, 8), (2, 4), (2, 8)])
def test_param_bytes_match_hand_computation(recipe, tp, ep):
    config, arch = recipe
    config = dataclasses.replace(config)  # the fixture is shared: change a copy
    config.actor = dataclasses.replace(config.actor, megatron=dataclasses.replace(
        config.actor.megatron, tensor_model_parallel_size=tp, expert_model_parallel_size=ep))  # fmt: skip
    stage = plan.plan_memory(config, arch, 8).training
    params = stage.row("params (bfloat16)").training
    assert params == hand_param_bytes(tp, ep)
    assert stage.row("grads (fp32)").training == 2 * params  # fp32 grads of bf16 params


def test_model_parameter_count_is_the_published_one():
    arch = load_arch(HF_CONFIG)
    # transformers counts 30,532,122,624 for this config (tests/test_param_count.py builds it on the meta device).
    assert plan.model_parameter_count(arch) == 30_532_122_624


def test_optimizer_bytes_shard_over_dp_and_expert_dp():
    arch = load_arch(HF_CONFIG)
    layout = ParallelLayout(2, 1, 1, 4, 1)  # 8 GPUs: DP 4 for dense params, expert-DP 2 for experts
    settings = plan.PlanSettings(layout=layout, world_size=8)
    stage = plan.stage_params(arch, layout, 0)
    assert plan.optimizer_bytes(stage, settings).gpu == round(12 * (stage.dense / 4 + stage.expert / 2))
    shard = stage.dense / 4 + stage.expert / 2
    # Hybrid CPU optimizer, all of it on the host; the precision-aware path (actor.py sets it with the CPU
    # optimizer) keeps the fp32 main shard there too.
    # fp32 params and Adam moments are torch AdamW's own tensors on the host: pageable.
    offloaded = dataclasses.replace(settings, optimizer_cpu_offload=True, optimizer_offload_fraction=1.0)
    result = plan.optimizer_bytes(stage, offloaded)
    assert (result.gpu, result.host) == (0, round(12 * shard))
    # Only the fp32 gradient copies are pinned, one per parameter shard, each a power of two: between 4 and 8
    # bytes per parameter.
    assert 4 * shard <= result.pinned < 8 * shard
    # megatron builds the hybrid optimizer from the whole params first: fp32 copies of all of them, once.
    assert result.startup == 4 * stage.total
    half = plan.optimizer_bytes(stage, dataclasses.replace(offloaded, optimizer_offload_fraction=0.5))
    assert (half.gpu, half.host, half.pinned) == (round(12 * 0.5 * shard), round(12 * 0.5 * shard),
                                                  round(0.5 * result.pinned))  # fmt: skip
    # Without the precision-aware path the fp32 main shard would stay on the GPU.
    legacy = plan.optimizer_bytes(stage, dataclasses.replace(offloaded, precision_aware_optimizer=False))
    assert legacy.gpu == round(4 * shard)


def test_pinned_gradient_copies_are_powers_of_two_by_hand(recipe):
    """The recipe (EP 8, expert-DP 1): every expert weight is its own shard; its pinned fp32 gradient copy rounds
    up to a power of two: fc1 [2·768, 2048] to 16 MiB (from 12), fc2 [2048, 768] to 8 MiB (from 6)."""
    config, arch = recipe
    settings = plan.PlanSettings.from_config(config, 8)
    stage = plan.stage_params(arch, settings.layout, 0)
    experts_only = dataclasses.replace(stage, dense=0, dense_tensors=())
    pinned = plan.optimizer_bytes(experts_only, settings).pinned
    assert pinned == 48 * (128 // 8) * (16 + 8) * 2**20
    assert pinned == pytest.approx(4 / 3 * 4 * stage.expert)


def test_offloaded_params_have_one_pinned_power_of_two_copy_per_buffer(recipe):
    config, arch = recipe
    stage = plan.plan_memory(config, arch, 8).training
    params = stage.row("params (bfloat16)")
    dense_gib, expert_gib = 2, 8  # 0.78B dense params in 1.55 GB, 3.62B expert params in 7.25 GB
    assert params.pinned == (dense_gib + expert_gib) * GIB and params.host == 0


# --- offload ----------------------------------------------------------------------------------------------------------


def test_offload_reduces_rollout_residency_by_exactly_the_offloaded_parts(recipe):
    config, arch = recipe
    # The optimizer state on the GPU (not Megatron's CPU optimizer), so that offloading it has something to move.
    base = dataclasses.replace(plan.PlanSettings.from_config(config, 8), optimizer_cpu_offload=False)
    resident = dataclasses.replace(base, param_offload=False, grad_offload=False, optimizer_offload=False)
    before = plan.plan_from_settings(arch, resident).rollout
    parts = {"param_offload": "params (bfloat16)", "grad_offload": "grads (fp32)", "optimizer_offload": "optimizer"}
    for flag, row in parts.items():
        after = plan.plan_from_settings(arch, dataclasses.replace(resident, **{flag: True})).rollout
        assert before.rollout - after.rollout == before.row(row).training > 0, flag
        assert after.training == before.training  # training holds everything again
    everything = plan.plan_from_settings(arch, base).rollout
    offloaded = sum(before.row(row).training for row in parts.values())
    assert before.rollout - everything.rollout == offloaded
    # What is left while rolling out is the SGLang servers' static share, nothing of the trainer's.
    assert everything.rollout == round(config.rollout.mem_fraction_static * 80 * GIB)


def test_engine_counts_in_training_without_memory_saver(recipe):
    config, arch = recipe
    settings = dataclasses.replace(plan.PlanSettings.from_config(config, 8), rollout_memory_saver=False)
    with_saver = plan.plan_from_settings(arch, plan.PlanSettings.from_config(config, 8)).training
    without = plan.plan_from_settings(arch, settings).training
    assert without.training - with_saver.training == round(config.rollout.mem_fraction_static * 80 * GIB)


# --- activations ------------------------------------------------------------------------------------------------------


def test_full_recompute_keeps_only_layer_inputs():
    arch = load_arch(HF_CONFIG)
    settings = plan.PlanSettings(layout=ParallelLayout(2, 1, 1, 8, 1), world_size=8, max_tokens_per_micro_batch=16384,
                                 max_sequence_length=10240, recompute_granularity="full")  # fmt: skip
    stage = plan.stage_params(arch, settings.layout, 0)
    full = plan.activation_bytes(arch, stage, settings)
    assert full.kept == 48 * 2 * arch.hidden_size * 16384 // 2  # one bf16 [T/TP, h] input per layer
    none = plan.activation_bytes(arch, stage, dataclasses.replace(settings, recompute_granularity=None))
    per_layer = (plan.attention_bytes_per_token(arch) + plan.moe_bytes_per_token(arch, 1)) * 16384 // 2
    assert none.kept == 48 * per_layer
    assert full.backward_work == none.backward_work + per_layer  # plus the one recomputed layer
    assert full.output == none.output > 0  # logits do not depend on recompute


def test_pipeline_plans_first_and_last_stage():
    arch = load_arch(HF_CONFIG)
    settings = plan.PlanSettings(layout=ParallelLayout(1, 4, 1, 8, 1), world_size=32, recompute_granularity="full")
    memory = plan.plan_from_settings(arch, settings)
    first, last = memory.stages
    assert (first.params.stage, last.params.stage) == (0, 3) and first.params.num_layers == 12
    first_act = plan.activation_bytes(arch, first.params, settings)
    last_act = plan.activation_bytes(arch, last.params, settings)
    assert first_act.output == 0 < last_act.output  # logits live on the last stage only
    # 1F1B: the first stage keeps 4 micro-batches' layer inputs, the last one.
    assert first_act.kept == 4 * last_act.kept
    assert first.row("activations kept for backward").training == first_act.kept


# --- the plan against what the actor allocates ------------------------------------------------------------------------


def test_plan_matches_the_actors_allocations_in_two_layouts(tiny_hf_dir, tmp_path):
    """Per rank: bytes of the DDP param and grad buffers and of the optimizer's own device tensors (fp32 main params
    and Adam moments, as megatron's init_state_fn allocates them) in bf16, against the plan's rows; and offload
    frees all three (the hybrid optimizer's GPU half too) and reload restores them (~25 s)."""
    from torchrun import torchrun

    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    train_file = write_arithmetic_jsonl(str(tmp_path / "train.jsonl"), num=4)
    offload = [f"actor.megatron.{name}_offload=true" for name in ("param", "grad", "optimizer")]
    hybrid = ["actor.megatron.optimizer_cpu_offload=true", "actor.megatron.optimizer_offload_fraction=0.5"]
    layouts = {
        # dense params sharded over DP 2, experts over expert-DP 1; then TP 2 with sequence parallel, DP 1
        "tp1_ep2": ["actor.megatron.expert_model_parallel_size=2", *offload],
        "tp2_ep2": ["actor.megatron.tensor_model_parallel_size=2", "actor.megatron.expert_model_parallel_size=2"],
        "hybrid_half": ["actor.megatron.expert_model_parallel_size=2", *hybrid, *offload],
    }
    result = torchrun("actor_memory.py", "--hf-dir", tiny_hf_dir, "--train-file", train_file,
                      "--layouts", json.dumps(layouts))  # fmt: skip
    for name, ranks in result.items():
        assert len(ranks) == 2
        for rank, row in enumerate(ranks):
            real = row["real"]
            assert all(value > 0 for value in real.values()), (name, rank, real)
            if name != "hybrid_half":  # which params the hybrid optimizer keeps on the GPU goes by whole params
                for part, value in real.items():
                    assert row["plan"][part] == pytest.approx(value, rel=0.05), (name, rank, part, row["plan"])
            if name != "tp2_ep2":
                assert row["offloaded"] == {"params": 0, "grads": 0, "optimizer": 0}, (name, rank)
                assert row["reloaded"] == real, (name, rank)


def test_unfused_swiglu_keeps_its_silu_output_and_logits_get_a_second_copy():
    arch = load_arch(HF_CONFIG)
    f, k = arch.moe_intermediate_size, arch.num_experts_per_tok
    # Fused (TE): fc1 output 2f and the weighted SwiGLU output f per routed copy; unfused: + silu and SwiGLU output.
    assert plan.moe_bytes_per_token(arch, 1, fused=False) - plan.moe_bytes_per_token(arch, 1) == 2 * 2 * f * k
    assert plan.dense_mlp_bytes_per_token(arch, fused=False) - plan.dense_mlp_bytes_per_token(arch) == 2 * (
        arch.intermediate_size
    )
    # One sample of 4096 tokens, no chunking, TP 2: the bf16 logits [T, V/2] twice (transposed copy / contiguous
    # gradient) outweigh two fp32 work chunks only when the chunk is small; with 512-token chunks they do.
    layout = ParallelLayout(2, 1, 1, 8, 1)
    settings = plan.PlanSettings(layout=layout, world_size=8, max_tokens_per_micro_batch=4096, log_prob_chunk_size=512)
    logits = 2 * 4096 * arch.padded_vocab_size // 2
    inputs = 2 * 2 * arch.hidden_size * 4096 // 2
    assert plan.output_layer_bytes(arch, settings) == inputs + 2 * logits
    unchunked = dataclasses.replace(settings, log_prob_chunk_size=None)
    assert plan.output_layer_bytes(arch, unchunked) == inputs + logits + 2 * 4 * 4096 * arch.padded_vocab_size // 2


def test_critic_adds_a_second_model_state_without_the_lm_head(recipe):
    """algorithm.adv_estimator=gae: the critic's params, grads and optimizer on top, offloaded like the actor's; its
    last stage has the value head (h params) instead of the output layer (V·h/t)."""
    config, arch = recipe
    settings = plan.PlanSettings.from_config(config, 8)
    assert not settings.critic
    with_critic = dataclasses.replace(settings, critic=True)
    base, both = plan.plan_from_settings(arch, settings), plan.plan_from_settings(arch, with_critic)
    layout = settings.layout
    for stage, stage_with in zip(base.stages, both.stages):
        actor = plan.stage_params(arch, layout, stage.params.stage)
        critic = plan.critic_stage_params(arch, layout, stage.params.stage)
        last = stage.params.stage == layout.pp - 1
        assert critic.total == actor.total - (arch.padded_vocab_size * arch.hidden_size // layout.tp - arch.hidden_size
                                              if last else 0)  # fmt: skip
        rows = [row for row in stage_with.rows if row.name.startswith(plan.CRITIC)]
        assert [row.name for row in rows] == [plan.CRITIC + row.name for row in stage.rows[:3]]
        # bf16 params 2 + fp32 grads 4 bytes per parameter (DDP's 64-element alignment adds < 0.1%), and the
        # optimizer as the actor's (the recipe's hybrid CPU optimizer: on the host).
        assert rows[0].training + rows[1].training == pytest.approx(6 * critic.total, rel=1e-3)
        optimizer = plan.optimizer_bytes(critic, settings)
        assert (rows[2].training, rows[2].host) == (optimizer.gpu, optimizer.host) and optimizer.host > 0
        assert stage_with.training - stage.training == sum(row.training for row in rows)
        # The recipe offloads everything while rolling out: the critic takes no GPU memory then.
        assert sum(row.rollout for row in rows) == 0


# --- the Qwen2.5-7B-Instruct recipe (the seed's example 2) ------------------------------------------------------------

RECIPE_7B = os.path.join(ROOT, "recipes", "qwen2_5_7b")


def test_qwen2_5_7b_recipe_validates_and_fits_8x_h100_80gb(capsys):
    config, arch = plan.load_plan_config(os.path.join(RECIPE_7B, "config.yaml"), [], world_size=8)
    assert (arch.family, arch.qkv_bias, arch.qk_norm, arch.tie_word_embeddings, arch.is_moe) == (
        "qwen2", True, False, False, False)  # fmt: skip
    # The seed's example 2: SAPO with tau 1.0 / 1.05, 256 prompts per step, 8 GPUs per node.
    actor = config.actor
    assert (actor.policy_loss.loss_mode, actor.tau_pos, actor.tau_neg) == ("sapo", 1.0, 1.05)
    assert (config.algorithm.adv_estimator, config.data.train_batch_size, config.trainer.n_gpus_per_node) == (
        "grpo", 256, 8)  # fmt: skip
    memory = plan.plan_memory(config, arch, 8, gpu_memory_gib=80)
    assert memory.fits_training and memory.fits_rollout
    assert 55 * GIB < memory.training.training + memory.headroom_bytes <= 60 * GIB  # 58.3 GiB with 5 GiB headroom
    assert plan.main(["--config", os.path.join(RECIPE_7B, "config.yaml"), "--nodes", "1", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM 7.616B params (28 layers, dense)" in out
    assert "TP=2 PP=1 CP=1 EP=1 ETP=1 -> DP=4" in out and "=> FITS" in out


def test_qwen2_5_7b_parameter_count_is_transformers_and_the_published_one():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = os.path.join(RECIPE_7B, "hf_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_config))
    count = plan.model_parameter_count(load_arch(hf_config))
    assert count == sum(p.numel() for p in model.parameters()) == 7_615_616_512  # q/k/v biases, untied lm_head
    # The model card: "Number of Parameters: 7.61B", "Number of Parameters (Non-Embedding): 6.53B".
    assert round(count / 1e9, 2) == 7.62 and int(count / 1e7) / 100 == 7.61
    embeddings = 2 * 152064 * 3584
    assert round((count - embeddings) / 1e9, 2) == 6.53


def test_tied_embeddings_hold_one_vocab_matrix_with_one_stage_and_a_copy_with_two(tiny_model):
    arch = load_arch(tiny_model("qwen2"))  # tied, q/k/v biases, no qk-norm
    one = plan.stage_params(arch, ParallelLayout(), 0)
    first, last = (plan.stage_params(arch, ParallelLayout(pipeline_model_parallel_size=2), stage) for stage in (0, 1))
    vocab = arch.padded_vocab_size * arch.hidden_size
    assert one.dense == first.dense + last.dense - vocab  # the last stage's copy is the only difference
    assert plan.model_parameter_count(arch) == one.dense - (arch.padded_vocab_size - arch.vocab_size) * arch.hidden_size
