import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Qwen3-MoE HF checkpoint with its sentencepiece tokenizer, made once per session."""
    from megatron_sapo.models.tiny import make_tiny_qwen3_moe

    return make_tiny_qwen3_moe(str(tmp_path_factory.mktemp("tiny_qwen3_moe")))
