"""The seed document's three example command lines, as written, with only the program, the model and the data swapped
for tiny ones: each goes through ``megatron_sapo.train``'s argument parsing and the whole config validation, and the
third (SAPO + GAE with a critic) through two training steps.

The lines are copied from ``../shared/seed/sapo_trainer_README_CN.md``; when that file is at hand the test checks
that they still read the same there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from torchrun import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = os.path.join(REPO, "..", "shared", "seed", "sapo_trainer_README_CN.md")

EXAMPLE_1 = r"""python3 -m verl.trainer.main_ppo \
    --config-name=ppo_megatron_trainer \
    algorithm.adv_estimator=grpo \
    actor_rollout_ref.actor.policy_loss.loss_mode=sapo \
    actor_rollout_ref.actor.tau_pos=1.0 \
    actor_rollout_ref.actor.tau_neg=1.05 \
    actor_rollout_ref.model.path=Qwen/Qwen3-30B-A3B-Base \
    actor_rollout_ref.actor.megatron.expert_model_parallel_size=8 \
    data.max_response_length=8192 \
    trainer.total_epochs=10"""

EXAMPLE_2 = r"""python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    actor_rollout_ref.actor.policy_loss.loss_mode=sapo \
    actor_rollout_ref.actor.tau_pos=1.0 \
    actor_rollout_ref.actor.tau_neg=1.05 \
    actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct \
    data.train_batch_size=256 \
    trainer.n_gpus_per_node=8"""

EXAMPLE_3 = r"""python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=gae \
    actor_rollout_ref.actor.policy_loss.loss_mode=sapo \
    critic.policy_loss.loss_mode=sapo \
    trainer.critic_warmup=10 \
    actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct"""

# The seed's config notes: "clip_ratio_low=null / clip_ratio_high=null" (SAPO replaces clipping).
SEED_CONFIG_NOTES = ("actor_rollout_ref.actor.clip_ratio_low=null", "actor_rollout_ref.actor.clip_ratio_high=null")

VERL_PROGRAM = ["python3", "-m", "verl.trainer.main_ppo"]
CRITIC_METRICS = ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/explained_variance",
                  "critic/grad_norm", "critic/lr", "timing/values", "timing/update_critic")  # fmt: skip
NUM_PROMPTS = 20


def _argv(line: str, model_dir: str) -> list[str]:
    """The line's arguments after verl's program, with the hub model swapped for ``model_dir``."""
    tokens = line.replace("\\\n", " ").split()
    assert tokens[:3] == VERL_PROGRAM
    return [f"{t.split('=')[0]}={model_dir}" if t.split("=")[0].endswith("model.path") else t for t in tokens[3:]]


@pytest.mark.skipif(not os.path.isfile(SEED), reason="the seed document is not next to this checkout")
@pytest.mark.parametrize("line", [EXAMPLE_1, EXAMPLE_2, EXAMPLE_3])
def test_lines_are_the_seeds(line):
    with open(SEED, encoding="utf-8") as f:
        seed = " ".join(f.read().replace("\\\n", " ").split())
    assert " ".join(line.replace("\\\n", " ").split()) in seed


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """Qwen3-30B-A3B's stand-in: its family, with 8 experts (for EP=8) and room for 1024 + 8192 tokens."""
    from megatron_sapo.models.tiny import make_tiny_model, tiny_sizes

    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3_moe")), "qwen3_moe",
                           tiny_sizes("qwen3_moe", num_experts=8, max_position_embeddings=16384))  # fmt: skip


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """Qwen2.5-7B-Instruct's stand-in: a tiny Qwen2 (q/k/v biases, tied embeddings)."""
    from megatron_sapo.models.tiny import make_tiny_model, tiny_sizes

    sizes = tiny_sizes("qwen2", max_position_embeddings=4096)  # the default prompt + response lengths fit
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2", sizes)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    return write_arithmetic_jsonl(str(tmp_path_factory.mktemp("data") / "train.jsonl"), num=NUM_PROMPTS,
                                  max_operand=5)  # fmt: skip


def _load(line: str, model_dir: str, train_file: str, *extra: str, world_size: int):
    from megatron_sapo.config import load_config
    from megatron_sapo.train import parse_args

    args = parse_args([*_argv(line, model_dir), f"data.train_files=[{train_file}]", *extra])
    return load_config(args.config, args.overrides, world_size=world_size)


def test_example_1_qwen3_moe_total_epochs(moe_dir, train_file):
    from megatron_sapo.config import resolve_total_steps
    from megatron_sapo.train import parse_args

    assert parse_args(_argv(EXAMPLE_1, moe_dir)).config_name == "ppo_megatron_trainer"
    config = _load(EXAMPLE_1, moe_dir, train_file, world_size=8)
    actor = config.actor
    assert (actor.policy_loss.loss_mode, actor.tau_pos, actor.tau_neg) == ("sapo", 1.0, 1.05)
    assert actor.megatron.expert_model_parallel_size == 8
    assert config.data.max_response_length == 8192
    # verl: total_epochs × whole batches per epoch; an explicit total_steps wins.
    assert config.trainer.total_steps is None and config.trainer.total_epochs == 10
    batch = config.data.train_batch_size
    assert resolve_total_steps(config.trainer, config.data, NUM_PROMPTS) == 10 * (NUM_PROMPTS // batch)
    config.trainer.total_steps = 3
    assert resolve_total_steps(config.trainer, config.data, NUM_PROMPTS) == 3


def test_too_few_prompts_for_an_epoch_is_one_line(moe_dir, train_file):
    from megatron_sapo.config import resolve_total_steps
    from megatron_sapo.errors import InputError

    config = _load(EXAMPLE_1, moe_dir, train_file, "data.train_batch_size=32", world_size=8)
    with pytest.raises(InputError, match=r"^trainer.total_epochs=10: data.train_files hold 20 prompts, fewer than "
                       r"one batch \(data.train_batch_size=32\)"):  # fmt: skip
        resolve_total_steps(config.trainer, config.data, NUM_PROMPTS)


def test_example_2_dense_and_launch_size(dense_dir, train_file):
    from megatron_sapo.errors import InputError

    config = _load(EXAMPLE_2, dense_dir, train_file, world_size=8)
    assert config.data.train_batch_size == 256 and config.trainer.n_gpus_per_node == 8
    with pytest.raises(InputError) as error:
        _load(EXAMPLE_2, dense_dir, train_file, world_size=2)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("trainer.n_gpus_per_node=8 × trainer.nnodes=1 = 8 processes, but torchrun started 2")
    assert "torchrun --nnodes=1 --nproc_per_node=8" in message


def test_seed_clip_ratio_null(dense_dir, train_file):
    """SAPO ignores the clip bounds; the PPO modes fall back to actor.clip_ratio as verl's do."""
    config = _load(EXAMPLE_2, dense_dir, train_file, *SEED_CONFIG_NOTES, world_size=8)
    assert (config.actor.clip_ratio_low, config.actor.clip_ratio_high) == (None, None)
    config = _load(EXAMPLE_2, dense_dir, train_file, *SEED_CONFIG_NOTES, "actor.policy_loss.loss_mode=vanilla",
                   "actor.clip_ratio=0.28", "actor.clip_ratio_high=0.3", world_size=8)  # fmt: skip
    assert config.actor.clip_range == (0.28, 0.3)


def test_example_3_gae_with_critic_trains_two_steps(dense_dir, train_file, tmp_path):
    config = _load(EXAMPLE_3, dense_dir, train_file, world_size=2)
    assert config.algorithm.adv_estimator == "gae"
    assert config.trainer.critic_warmup == 10
    out = str(tmp_path / "run")
    tiny = [
        f"data.train_files=[{train_file}]", "data.max_prompt_length=32", "data.max_response_length=8",
        "data.train_batch_size=2", "rollout.n=2", "actor.ppo_mini_batch_size=2", "model.dtype=float32",
        "trainer.total_steps=2", "trainer.save_freq=1", f"trainer.output_dir={out}", "trainer.export_hf_at_end=false",
        "trainer.tensorboard=false", "reward.num_workers=1",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "megatron_sapo.train", *_argv(EXAMPLE_3, dense_dir), *tiny,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    from megatron_sapo.metrics import read_metrics

    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        missing = [key for key in CRITIC_METRICS if key not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert row["critic/grad_norm"] > 0 and 0 < row["critic/vf_loss"] < float("inf")
        # trainer.critic_warmup=10 (verl: the actor updates once critic_warmup <= step): steps 1-9 train the critic
        # alone; the engine is not synced then, so the trainer's log-probs equal the engine's only if the policy
        # stayed exactly as it was.
        assert "actor/pg_loss" not in row and "actor/grad_norm" not in row
        assert row["rollout/logprob_diff"] < 1e-5
    # A checkpoint in the warm-up (an actor optimizer that never stepped) holds the critic beside the actor.
    ckpt = os.path.join(out, "checkpoints", "iter_0000002")
    with open(os.path.join(ckpt, "manifest.json")) as f:
        files = json.load(f)["files"]
    assert "critic/metadata.json" in files and "metadata.json" in files
