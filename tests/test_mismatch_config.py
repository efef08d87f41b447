"""Config keys of train-inference mismatch control (actor.router_replay.*, algorithm.rollout_correction.*): one
clear line for nonsense, and the recipes' choices. (~2 s)"""

import os

import pytest

from megatron_sapo.config import load_config
from megatron_sapo.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "tiny": os.path.join(REPO, "recipes", "tiny_moe", "config.yaml"),
    "30b": os.path.join(REPO, "recipes", "qwen3_30b_a3b", "config.yaml"),
    "30b_multinode": os.path.join(REPO, "recipes", "qwen3_30b_a3b", "config_multinode.yaml"),
}
HF_30B = os.path.join(REPO, "recipes", "qwen3_30b_a3b", "hf_config")


def _load(tiny_hf_dir, *overrides):
    return load_config(RECIPES["tiny"], list(overrides), world_size=2, check_paths=False, hf_config_dir=tiny_hf_dir)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["actor.router_replay.mode=R4"], "actor.router_replay.mode='R4': use one of disabled, R2, R3"),
        (["actor.router_replay.mode=R2", "algorithm.rollout_correction.bypass_mode=true"],
         "actor.router_replay.mode=R2 replays the routing of the old-log-prob pass"),
        (["algorithm.rollout_correction.rollout_is=tok"], "algorithm.rollout_correction.rollout_is='tok': use null"),
        (["algorithm.rollout_correction.rollout_rs=geometric"], "algorithm.rollout_correction.rollout_rs_threshold"),
        (["algorithm.rollout_correction.rollout_is=token", "actor.tis_cap=2.0"], "actor.tis_cap=2.0 and "),
        (["algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.bypass_mode=true"],
         "algorithm.rollout_correction.bypass_mode=true makes the engine's log-probs the old policy"),
        (["algorithm.rollout_correction.rollout_isx=token"], "algorithm.rollout_correction.rollout_isx: unknown key"),
    ],
)  # fmt: skip
def test_nonsense_is_one_line(tiny_hf_dir, overrides, expected):
    with pytest.raises(InputError) as error:
        _load(tiny_hf_dir, *overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_verl_spellings_load(tiny_hf_dir):
    config = _load(
        tiny_hf_dir, "actor_rollout_ref.actor.router_replay.mode=R3",
        "algorithm.rollout_correction.rollout_is=sequence",
        "algorithm.rollout_correction.rollout_is_threshold=5.0", "algorithm.rollout_correction.rollout_rs=seq_mean_k3",
        "algorithm.rollout_correction.rollout_rs_threshold=0.01",
    )  # fmt: skip
    assert config.actor.router_replay.mode == "R3"
    assert config.algorithm.rollout_correction.rollout_rs == "seq_mean_k3"


@pytest.mark.parametrize("recipe, world_size", [("tiny", 2), ("30b", 8), ("30b_multinode", 32)])
def test_sapo_recipes_use_the_papers_aggregation(recipe, world_size, tiny_hf_dir):
    hf = tiny_hf_dir if recipe == "tiny" else HF_30B
    config = load_config(RECIPES[recipe], [], world_size=world_size, check_paths=False, hf_config_dir=hf)
    assert config.actor.policy_loss.loss_mode == "sapo" and config.actor.loss_agg_mode == "seq-mean-token-mean"
    # The recipes replay the rollout engine's routing (R3); the CPU demo is their twin.
    assert config.actor.router_replay.mode == "R3"
