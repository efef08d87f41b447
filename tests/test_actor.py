"""The Megatron actor's log-probs and SAPO update equal a plain transformers + Adam computation, in every layout."""

import pytest
from torchrun import torchrun

LAYOUTS = {
    "tp2_sp_chunked": [
        "actor.megatron.tensor_model_parallel_size=2",
        "actor.megatron.expert_tensor_parallel_size=2",
        "actor.log_prob_chunk_size=5",
    ],
    "ep2_dp2": ["actor.megatron.expert_model_parallel_size=2"],
    "pp2": ["actor.megatron.pipeline_model_parallel_size=2"],
}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    return write_arithmetic_jsonl(str(tmp_path_factory.mktemp("data") / "train.jsonl"), 20)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sapo_update_matches_reference(tiny_hf_dir, train_file, layout):
    result = torchrun("actor_step.py", "--hf-dir", tiny_hf_dir, "--train-file", train_file, *LAYOUTS[layout])
    # Temperature-scaled log-probs of the sampled tokens, from length-bucketed micro-batches.
    assert result["log_prob_max_abs_diff"] <= 1e-5
    # Two Adam steps (lr 1e-3) move weights by up to 2e-3; the reference repeats them in one process.
    assert result["max_abs_weight_diff"] <= 2e-5
    reference_norms = result["reference_grad_norms"]
    assert min(reference_norms) > 0.1
    assert result["metrics"]["grad_norm"] == pytest.approx(sum(reference_norms) / 2, rel=1e-5)
    assert result["metrics"]["grad_weight_mean"] < 1.0  # old log-probs were perturbed: the SAPO gate is active
    assert result["metrics"]["ratio_max"] > 1.2
