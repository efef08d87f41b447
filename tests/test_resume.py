"""Exact resume from a later checkpoint, on the actor itself (tests/dist/resume_check.py, EP=2, DP=2).

A checkpoint written after two training steps (four Adam steps) is loaded into a fresh actor, which trains steps 3-4
on the same batches as the uninterrupted actor: per-step metrics and final weights must be identical, in float32, in
bfloat16, with param/grad/optimizer offload between steps, and with GAE's critic (its own optimizer history, four
critic Adam steps per training step, saved in the checkpoint's ``critic/`` folder, and offloaded; the actor, in
its warm-up until step 3, saved with an optimizer that has not stepped). This catches megatron-core
0.16.1 loading torch Adam's ``step`` as one tensor shared by every parameter and reset to 0 (bias correction
restarting, then running as many times too fast as there are parameters): before the fix the weights differed by
3e-3 after two resumed steps.
"""

import pytest
from torchrun import torchrun


@pytest.fixture(scope="module")
def resumed(tiny_hf_dir, tmp_path_factory):
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    folder = tmp_path_factory.mktemp("resume")
    train_file = write_arithmetic_jsonl(str(folder / "train.jsonl"), num=8)
    variants = ["--variant", "fp32", "--variant", "bf16", "--variant", "offload", "--variant", "gae"]
    return torchrun("resume_check.py", "--hf-dir", tiny_hf_dir, "--train-file", train_file, "--ckpt-dir",
                    str(folder / "checkpoints"), *variants)  # fmt: skip


@pytest.mark.parametrize("variant", ["fp32", "bf16", "offload", "gae"])
def test_resume_from_a_later_checkpoint_is_exact(resumed, variant):
    result = resumed[variant]
    # Every parameter gets its own Adam step, holding the 2 x 2 optimizer steps taken before the save (gae: none,
    # the actor waits for the critic's warm-up until step 3).
    assert result["adam_step_after_load"]["values"] == ([0.0] if variant == "gae" else [4.0])
    assert result["adam_step_after_load"]["distinct_tensors"] == result["adam_step_after_load"]["count"] > 1
    assert sorted(result["resumed"]) == ["3", "4"]
    for step, metrics in result["resumed"].items():
        assert metrics["grad_norm"] > 0
        for key, value in result["full"][step].items():
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-6), f"step {step} {key}"
    assert result["weights_equal"], result["max_abs_weight_diff"]
    if variant == "gae":
        # critic.ppo_epochs=2 × 2 mini-batches × 2 steps before the save; its metrics are among those compared.
        assert result["critic_adam_step_after_load"]["values"] == [8.0]
        assert result["critic_adam_step_after_load"]["distinct_tensors"] > 1
        assert all(metrics["critic/grad_norm"] > 0 for metrics in result["resumed"].values())
        assert result["critic_params"] > 0 and result["critic_weights_equal"]


def test_resume_with_another_data_parallel_size(tiny_hf_dir, tmp_path):
    """Saved at DP=2, loaded at DP=1: the optimizer format allows it, and the RNG states (keyed by model-parallel
    position, no longer by world size) do not stand in the way."""
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    train_file = write_arithmetic_jsonl(str(tmp_path / "train.jsonl"), num=8)
    common = ("--hf-dir", tiny_hf_dir, "--train-file", train_file, "--ckpt-dir", str(tmp_path / "checkpoint"))
    saved = torchrun("resume_other_dp.py", *common, "--save", nproc=2)
    loaded = torchrun("resume_other_dp.py", *common, nproc=1)
    assert (saved["world_size"], loaded["world_size"]) == (2, 1)
    assert loaded["weights_sum"] == pytest.approx(saved["weights_sum"], rel=1e-12)
    assert loaded["adam_step_after_load"]["values"] == [2.0]
