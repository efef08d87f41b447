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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in MEGATRON_TEST_FILES:
            item.add_marker(pytest.mark.megatron)
