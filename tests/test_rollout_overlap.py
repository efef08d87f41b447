"""``trainer.rollout_mode=one_step_off`` under torchrun: step t+1's batch is generated while step t trains.

One run (4 steps, checkpoints at 2 and 4) and a resume from its step-2 checkpoint (~60 s together on 2 cores). The
weight versions the engine stamped on the samples must be the ones the schedule implies (step t's batch is made by
the weights of step t-2), so the staleness is exactly 1 after the first step; the batch in flight at the step-2
checkpoint is in it, and the resumed run reproduces steps 3-4 exactly.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_trainer import RECIPE, _assert_same_steps, _hf_tensors, _metrics, _overrides, _train, inputs  # noqa: F401

from megatron_sapo.trainer import IN_FLIGHT_KEY, _decode_batch

# The rollout server on devices of its own (the demo recipe colocates a TP-2 server): one TP rank, broadcast sync.
DEDICATED = ("rollout.tp_size=1", "rollout.enable_memory_saver=false", "rollout.weight_sync=distributed")


@pytest.fixture(scope="module")
def overlap_run(inputs, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("one_step_off") / "run")
    _train(_overrides(inputs, out, *DEDICATED, "trainer.rollout_mode=one_step_off", "trainer.max_checkpoints_to_keep=2",
                      "trainer.val_before_train=false"))  # fmt: skip
    return out


def test_every_sample_is_one_update_stale_after_the_first_step(overlap_run):
    rows = [row for row in _metrics(overlap_run) if "actor/pg_loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [(row["rollout/staleness_mean"], row["rollout/staleness_max"]) for row in rows] == [
        (0.0, 0.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0),
    ]  # fmt: skip
    # Step 1 trains on what it generated: the trainer recomputes the engine's log-probs exactly (float32 both).
    # Later steps train one update ahead of the weights that sampled, so the two differ.
    assert rows[0]["rollout/logprob_diff"] < 1e-5
    assert all(row["rollout/logprob_diff"] > 1e-4 for row in rows[1:])


def test_the_batch_in_flight_is_in_the_checkpoint_with_its_weight_version(overlap_run):
    checkpoints = os.path.join(overlap_run, "checkpoints")
    with open(os.path.join(checkpoints, "iter_0000002", "trainer_state.json")) as f:
        state = json.load(f)
    batch = _decode_batch(state[IN_FLIGHT_KEY])
    # Generated during step 2, before its update: on the weights step 1 produced (the engine's meta_info).
    assert batch["weight_versions"] == ["1"] * 16
    assert len(batch["samples"].response_ids) == 16 and len(batch["scores"]) == 16
    with open(os.path.join(checkpoints, "iter_0000004", "trainer_state.json")) as f:
        assert IN_FLIGHT_KEY not in json.load(f)  # the last step leaves nothing in flight


def test_resumed_run_reproduces_the_uninterrupted_one(overlap_run, inputs, tmp_path):  # noqa: F811
    out = str(tmp_path / "run")
    resume = os.path.join(overlap_run, "checkpoints", "iter_0000002")
    _train(_overrides(inputs, out, *DEDICATED, "trainer.rollout_mode=one_step_off", f"trainer.resume={resume}",
                      "trainer.val_before_train=false"))  # fmt: skip
    resumed = _metrics(out)
    assert [row["step"] for row in resumed if "actor/pg_loss" in row] == [3, 4]
    _assert_same_steps(resumed, _metrics(overlap_run), steps=(3, 4))
    resumed_weights, uninterrupted = _hf_tensors(os.path.join(out, "hf")), _hf_tensors(os.path.join(overlap_run, "hf"))
    assert resumed_weights.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed_weights[name], uninterrupted[name]), name


@pytest.mark.parametrize("extra", [["rollout.enable_memory_saver=true"], ["actor.megatron.param_offload=true"],
                                   ["rollout.weight_sync=tensor", "rollout.tp_size=2"]])  # fmt: skip
def test_colocated_layout_with_overlap_is_one_clear_error(extra, inputs, tmp_path):  # noqa: F811
    from megatron_sapo.config import load_config
    from megatron_sapo.errors import InputError

    overrides = [*_overrides(inputs, str(tmp_path / "run"), *DEDICATED), *extra]
    with pytest.raises(InputError) as error:
        load_config(RECIPE, [*overrides, "trainer.rollout_mode=one_step_off"], world_size=2)
    message = str(error.value)
    assert message.startswith(f"trainer.rollout_mode=one_step_off: {extra[0]} shares") and "\n" not in message
    load_config(RECIPE, [*overrides, "trainer.rollout_mode=sync"], world_size=2)  # the same layout, in turn, is fine


def test_unknown_rollout_mode_is_one_clear_error(inputs, tmp_path):  # noqa: F811
    from megatron_sapo.config import load_config
    from megatron_sapo.errors import InputError

    with pytest.raises(InputError, match=r"^trainer.rollout_mode='async': use one of"):
        load_config(RECIPE, [*_overrides(inputs, str(tmp_path / "run")), "trainer.rollout_mode=async"], world_size=2)


def test_dedicated_rollout_nodes_recipe_is_one_step_off_and_fits(capsys):
    from megatron_sapo import plan

    recipe = os.path.join(os.path.dirname(RECIPE), "..", "qwen3_30b_a3b", "config_multinode_one_step_off.yaml")
    # As sbatch.slurm launches it on the 2 trainer nodes.
    config, _ = plan.load_plan_config(recipe, ["rollout.num_nodes=2", "rollout.node_hosts=[a,b]"], world_size=16)
    assert (config.trainer.rollout_mode, config.rollout.backend, config.rollout.weight_sync) == (
        "one_step_off", "external", "distributed",
    )  # fmt: skip
    assert plan.main(["--config", recipe, "--nodes", "2", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "offload while rolling out: nothing" in out and "rollout backend external" in out and "=> FITS" in out
