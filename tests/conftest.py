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
