"""One Adam step with Megatron's distributed optimizer equals transformers + torch.optim.Adam on one process."""

import pytest
from torchrun import torchrun


@pytest.mark.parametrize(
    "layout, expected_dp",
    [(["--tp", "2", "--etp", "2"], 1), (["--ep", "2"], 2)],
    ids=["tp2_sp", "ep2_dp2"],
)
def test_adam_step_matches_single_process_reference(tiny_hf_dir, layout, expected_dp):
    check_step(torchrun("adam_step.py", "--hf-dir", tiny_hf_dir, *layout), expected_dp)


def test_adam_step_of_tied_embeddings_split_over_pp2_matches_single_process_reference(tiny_model):
    """Qwen2 with tied embeddings under PP=2: the last stage's copy of the embedding gets the output layer's
    gradient, megatron sums the two copies' gradients over its embedding group, and both take the same step: the
    exported embedding equals transformers' one tied parameter after Adam, and the gradient norm counts it once."""
    check_step(torchrun("adam_step.py", "--hf-dir", tiny_model("qwen2"), "--pp", "2"), 1)


def check_step(result, expected_dp):
    assert result["step_succeeded"] and result["names_equal"]
    assert result["data_parallel_size"] == expected_dp
    # Adam's first step moves every weight with a gradient by ≈ lr = 1e-3, so 1e-5 is a real check; the gradient
    # norm (Adam is scale-invariant) catches a wrongly scaled gradient reduction.
    assert result["max_abs_weight_change"] > 5e-4
    assert result["max_abs_weight_diff"] <= 1e-5
    assert result["grad_norm"] == pytest.approx(result["reference_grad_norm"], rel=1e-5)
