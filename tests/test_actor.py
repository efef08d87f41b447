"""The Megatron actor's log-probs and SAPO update, and the critic's values and value-loss update, equal a plain
transformers + Adam computation, in every layout (one torchrun launch per layout runs both)."""

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
    "single": [],  # one process
}
NPROC = {"single": 1}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    return write_arithmetic_jsonl(str(tmp_path_factory.mktemp("data") / "train.jsonl"), 20)


@pytest.fixture(scope="module")
def token_classification_dir(tiny_hf_dir, tmp_path_factory):
    """The tiny model as transformers' Qwen3MoeForTokenClassification with one label (a verl-style critic export):
    the trunk and a random score head."""
    import torch
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(11)
    model = AutoModelForTokenClassification.from_pretrained(tiny_hf_dir, num_labels=1, dtype=torch.float32)
    folder = str(tmp_path_factory.mktemp("critic_hf"))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def step_results(tiny_hf_dir, train_file, token_classification_dir):
    """tests/dist/actor_step.py --critic per layout, run once for both tests."""
    cache = {}

    def run(layout):
        if layout not in cache:
            single = ["--critic-hf-dir", token_classification_dir] if layout == "single" else []
            cache[layout] = torchrun("actor_step.py", "--hf-dir", tiny_hf_dir, "--train-file", train_file, "--critic",
                                     *single, *LAYOUTS[layout], nproc=NPROC.get(layout, 2))  # fmt: skip
        return cache[layout]

    return run


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sapo_update_matches_reference(step_results, layout):
    result = step_results(layout)
    # Temperature-scaled log-probs of the sampled tokens, from length-bucketed micro-batches.
    assert result["log_prob_max_abs_diff"] <= 1e-5
    # Two Adam steps (lr 1e-3) move weights by up to 2e-3; the reference repeats them in one process.
    assert result["max_abs_weight_diff"] <= 2e-5
    reference_norms = result["reference_grad_norms"]
    assert min(reference_norms) > 0.1
    assert result["metrics"]["grad_norm"] == pytest.approx(sum(reference_norms) / 2, rel=1e-5)
    assert result["metrics"]["grad_weight_mean"] < 1.0  # old log-probs were perturbed: the SAPO gate is active
    assert result["metrics"]["ratio_max"] > 1.2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_critic_matches_reference(step_results, layout):
    critic = step_results(layout)["critic"]
    # Shown with pytest -rP.
    print(f"{layout}: critic values max |diff| {critic['value_max_abs_diff']:.2e}, after 2 steps "
          f"{critic['value_after_update_max_abs_diff']:.2e}, vf_loss {critic['vf_loss_before']:.4f} -> "
          f"{critic['vf_loss_after']:.4f}, from model.mcore_checkpoint "
          f"{critic['mcore_checkpoint_value_max_abs_diff']:.1e}")  # fmt: skip
    # Values of the states before each response token: transformers' final-norm hidden states times the head.
    assert critic["value_max_abs_diff"] <= 1e-5
    assert critic["values_zero_off_mask"]
    # The trunk from model.mcore_checkpoint (the initial policy saved as a Megatron checkpoint) instead of HF.
    assert critic["mcore_checkpoint_value_max_abs_diff"] <= 1e-6
    if layout == "single":  # critic.model.path = a ForTokenClassification export: its score.weight is the head
        print(f"ForTokenClassification head: values max |diff| {critic['token_classification_value_max_abs_diff']:.2e}")
        assert critic["token_classification_value_max_abs_diff"] <= 1e-5
    # Two value-loss Adam steps (lr 1e-3): the trunk and the head (its gradient summed over TP under sequence
    # parallelism, counted once in the norm) move as the reference's do.
    assert critic["value_after_update_max_abs_diff"] <= 5e-5
    reference_norms = critic["reference_grad_norms"]
    assert min(reference_norms) > 0.1
    metrics = critic["metrics"]
    assert metrics["grad_norm"] == pytest.approx(sum(reference_norms) / 2, rel=1e-5)
    assert 0 < metrics["vf_clipfrac"] < 1  # the old values were perturbed: the clip is active on some tokens
    # The update lowers the value loss on its batch (by little: the clip zeroes the gradient of many tokens).
    assert critic["vf_loss_after"] < critic["vf_loss_before"] - 1e-3
