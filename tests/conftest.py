import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family)``: a tiny random HF checkpoint of that family (models/tiny.py's defaults) with its
    sentencepiece tokenizer, made once per session."""
    from megatron_sapo.models.tiny import make_tiny_model

    made = {}

    def make(family: str) -> str:
        if family not in made:
            made[family] = make_tiny_model(str(tmp_path_factory.mktemp(f"tiny_{family}")), family)
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_model):
    """The tiny random Qwen3-MoE every MoE test uses."""
    return tiny_model("qwen3_moe")


# The files whose tests build a Megatron model, optimizer or checkpoint, convert, or run the trainer (the recipe twin
# included): `make test-mcore019` runs these under megatron-core 0.19 (Python 3.12) as well; the others (the loss
# math, rewards, data, the embedded server, the SGLang protocol) do not touch megatron-core.
MEGATRON_TEST_FILES = frozenset(
    f"test_{name}.py"
    for name in (
        "actor", "convert_cli", "faults", "loss_logprobs", "mapping", "mcore_compat", "model_parity", "optimizer_step",
        "param_count", "plan", "recipe_twin", "resume", "rollout_overlap", "rollout_weights", "routing_replay",
        "seed_command_lines", "trainer",
    )
)  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "megatron: builds Megatron-Core objects (both megatron-core legs run it)")
    config.addinivalue_line("markers", "mcore019: the Python 3.12 / megatron-core 0.19 leg's own checks")


# Tests in those files that the 0.19 leg leaves to the 0.16 leg, to keep CI within its time: each stops before
# megatron-core is reached (input checks), exercises only the rollout side (the embedded server, its weight
# updates from HF tensors, rollout scheduling), or repeats under the trainer a layout or switch that the 0.19 leg
# already runs directly (TP/PP layouts in test_actor/test_model_parity/test_routing_replay, offload in the recipe
# twin and test_offload_frees_and_restores_buffers).
LEFT_TO_THE_016_LEG = (
    "test_convert_cli.py::test_bad_input_is_one_line_and_leaves_nothing",
    "test_convert_cli.py::test_existing_output_is_never_overwritten_without_flag",
    "test_faults.py::test_killed_rollout_server_ends_the_run_with_one_line",
    "test_faults.py::test_bad_data_under_torchrun_stops_before_start_up",
    "test_rollout_overlap.py::",
    "test_rollout_weights.py::test_update_from_disk_generates_like_a_fresh_server",
    "test_rollout_weights.py::test_update_broadcast_from_two_trainer_ranks_generates_like_a_fresh_server",
    "test_rollout_weights.py::test_tensor_update_in_one_process_generates_like_a_fresh_server",
    "test_rollout_weights.py::test_the_server_holds_the_trainer_to_sglangs_order",
    "test_rollout_weights.py::test_a_refused_broadcast_bucket_fails_clearly_and_the_next_update_works",
    "test_rollout_weights.py::test_without_the_runs_api_key_weight_updates_are_refused_and_nothing_changes",
    "test_trainer.py::test_other_layouts_agree_with_expert_parallel_reference",
    "test_trainer.py::test_offloaded_run_equals_reference",
    "test_trainer.py::test_bad_config_exits_before_any_work",
    "test_trainer.py::test_bad_config_is_one_clear_error",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = f"{item.path.name}::{item.name}"
        if item.path.name in MEGATRON_TEST_FILES and not name.startswith(LEFT_TO_THE_016_LEG):
            item.add_marker(pytest.mark.megatron)
