"""The whole trainer under ``torchrun --nproc_per_node=2``: tiny Qwen3-MoE, embedded rollout server, arithmetic data.

One reference run (EP=2, 4 steps, a checkpoint every 2) anchors the rest: a run killed in the middle of its
step-4 save and resumed must reproduce steps 3-4 of the reference; a run with every offload switched on must
reproduce steps 1-2; a TP=2 run must agree with the reference's first step. In every step the log-probs the
trainer computes must match those the rollout engine sampled with (weight sync is exact).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from torchrun import free_port, torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "tiny_moe", "config.yaml")

# Timing and throughput differ from run to run; everything else must not.
NONDETERMINISTIC_PREFIXES = ("timing/", "perf/")
REQUIRED_METRICS = (
    "reward/mean", "reward/shaped_mean", "reward/num_errors", "reward/num_timeouts", "response_length/mean",
    "response_length/clip_frac", "rollout/logprob_diff", "actor/pg_loss", "actor/entropy", "actor/ratio_mean",
    "actor/grad_weight_mean", "actor/approx_kl", "actor/grad_norm", "actor/lr", "actor/update_skipped",
    "timing/rollout", "timing/old_log_probs", "timing/update", "timing/weight_sync", "perf/tokens_per_s",
)  # fmt: skip


# The untrained tiny model never answers right, so the math reward would give zero advantages and zero gradients;
# this custom reward (verl's compute_score signature) varies within every group.
DIGIT_SHARE_REWARD = """
def digit_share(data_source, solution_str, ground_truth, extra_info=None):
    return sum(c.isdigit() for c in solution_str) / max(len(solution_str), 1)
"""


@dataclass
class Inputs:
    hf_dir: str
    train_file: str
    val_file: str
    reward_function: str


@pytest.fixture(scope="module")
def inputs(tiny_hf_dir, tmp_path_factory):
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    folder = tmp_path_factory.mktemp("inputs")
    (folder / "digit_share.py").write_text(DIGIT_SHARE_REWARD)
    train_file = write_arithmetic_jsonl(str(folder / "train.jsonl"), num=16, max_operand=5)
    val_file = write_arithmetic_jsonl(str(folder / "val.jsonl"), num=6, seed=1, max_operand=9)
    return Inputs(tiny_hf_dir, train_file, val_file, f"{folder / 'digit_share.py'}:digit_share")


def _overrides(inputs: Inputs, out: str, *extra: str) -> list[str]:
    return [
        f"model.path={inputs.hf_dir}", "model.mcore_checkpoint=null", f"data.train_files=[{inputs.train_file}]",
        "reward.type=custom", f"reward.custom_function={inputs.reward_function}",
        f"data.val_files=[{inputs.val_file}]", "trainer.test_freq=2",
        f"trainer.output_dir={out}", "trainer.total_steps=4", "trainer.save_freq=2",
        "trainer.max_checkpoints_to_keep=1",
        "data.train_batch_size=4", "rollout.n=4", "actor.ppo_mini_batch_size=2", "reward.num_workers=1", *extra,
    ]  # fmt: skip


def _train_command(overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "megatron_sapo.train", "--config", RECIPE, *overrides,
    ]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _train(overrides: list[str], timeout: float = 600) -> None:
    proc = subprocess.run(_train_command(overrides), capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, f"trainer exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def _metrics(out: str) -> list[dict]:
    from megatron_sapo.metrics import read_metrics

    return read_metrics(out)


def _hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            found.update(load_file(os.path.join(folder, name)))
    return found


def _assert_same_steps(actual: list[dict], expected: list[dict], steps, tol: float = 1e-6) -> None:
    by_step = {row["step"]: row for row in actual}
    for want in (row for row in expected if row["step"] in steps):
        got = by_step[want["step"]]
        for key, value in want.items():
            if key.startswith(NONDETERMINISTIC_PREFIXES):
                continue
            assert got[key] == pytest.approx(value, rel=tol, abs=tol), f"step {want['step']} {key}"


@pytest.fixture(scope="module")
def reference_run(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "run")
    _train(_overrides(inputs, out, "actor.megatron.expert_model_parallel_size=2"))
    return out


def test_reference_run_metrics_and_checkpoints(reference_run):
    rows = _metrics(reference_run)
    # Step 0: validation before training; then validation every test_freq=2 steps.
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert [("val/reward/mean" in row) for row in rows] == [True, False, True, False, True]
    for row in rows[1:]:
        missing = [key for key in REQUIRED_METRICS if key not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        # The trainer's log-probs of the sampled tokens equal the engine's: the weights it generated with are
        # exactly the trainer's (synced after every step), and both compute the same model in float32.
        assert row["rollout/logprob_diff"] < 1e-5
        assert 0.0 < row["reward/mean"] < 1.0
        assert row["actor/update_skipped"] == 0.0
        assert row["actor/grad_norm"] > 0.0
        assert row["actor/lr"] == pytest.approx(3e-4)
    checkpoints = os.path.join(reference_run, "checkpoints")
    # max_checkpoints_to_keep=1: the step-2 checkpoint was deleted once step 4's was published.
    assert sorted(os.listdir(checkpoints)) == ["iter_0000004", "latest"]
    assert open(os.path.join(checkpoints, "latest")).read().strip() == "iter_0000004"
    state = json.load(open(os.path.join(checkpoints, "iter_0000004", "trainer_state.json")))
    assert state["step"] == 4


def _greedy_digit_share(hf_dir: str, inputs: Inputs, max_new_tokens: int = 8) -> float:
    """Validation recomputed with transformers: greedy answers to the val prompts, scored by DIGIT_SHARE_REWARD."""
    from transformers import AutoModelForCausalLM

    from megatron_sapo.config import load_config
    from megatron_sapo.data import load_prompts, load_tokenizer

    config = load_config(RECIPE, _overrides(inputs, "unused"), world_size=2)
    tokenizer = load_tokenizer(inputs.hf_dir)
    namespace: dict = {}
    exec(DIGIT_SHARE_REWARD, namespace)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    scores = []
    for prompt in load_prompts(config.data, tokenizer, "val").items:
        ids = torch.tensor([prompt.prompt_ids])
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        response = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in response:
            response = response[: response.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(response, skip_special_tokens=True)
        scores.append(namespace["digit_share"]("arithmetic", text, prompt.label))
    return sum(scores) / len(scores)


def test_validation_equals_transformers_greedy_decoding(reference_run, inputs):
    """The val reward before training is the initial model's, the one after the last step the exported policy's."""
    rows = {row["step"]: row for row in _metrics(reference_run)}
    assert rows[0]["val/reward/mean"] == pytest.approx(_greedy_digit_share(inputs.hf_dir, inputs), abs=1e-9)
    final = _greedy_digit_share(os.path.join(reference_run, "hf"), inputs)
    assert rows[4]["val/reward/mean"] == pytest.approx(final, abs=1e-9)


def test_final_hf_export_equals_the_last_checkpoint(reference_run, tiny_hf_dir, tmp_path):
    """The exported HF policy is the step-4 checkpoint converted offline, tensor for tensor, and it changed."""
    converted = str(tmp_path / "converted")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_mcore_to_hf.py"), "--hf-template", tiny_hf_dir,
         "--mcore-dir", os.path.join(reference_run, "checkpoints", "iter_0000004"), "--out", converted],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    exported = _hf_tensors(os.path.join(reference_run, "hf"))
    offline, initial = _hf_tensors(converted), _hf_tensors(tiny_hf_dir)
    assert exported.keys() == offline.keys() == initial.keys()
    for name in exported:
        assert torch.equal(exported[name], offline[name]), name
    changed = [name for name in exported if not torch.equal(exported[name].float(), initial[name].float())]
    assert len(changed) > len(exported) // 2  # trained: lr 3e-4 moves nearly every tensor

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(reference_run, "hf"), dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_killed_while_saving_then_resumed_reproduces_the_reference(reference_run, inputs, tmp_path):
    out = str(tmp_path / "run")
    overrides = _overrides(inputs, out, "actor.megatron.expert_model_parallel_size=2")
    partial_save = os.path.join(out, "checkpoints", "iter_0000004.tmp")
    proc = subprocess.Popen(_train_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    try:
        while not os.path.isdir(partial_save):
            assert proc.poll() is None, f"trainer ended before its step-4 save\n{proc.stderr.read()[-6000:]}"
            assert time.monotonic() < deadline, "no step-4 save within 600 s"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-save
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    checkpoints = os.path.join(out, "checkpoints")
    assert open(os.path.join(checkpoints, "latest")).read().strip() == "iter_0000002"
    # Killed before the rename: no iter_0000004 at all; (rarely) just after it: a complete one, not yet `latest`.
    step4 = os.path.join(checkpoints, "iter_0000004")
    assert not os.path.exists(step4) or os.path.isfile(os.path.join(step4, "metadata.json"))

    _train(overrides)  # trainer.resume=auto: from iter_0000002

    resumed = _metrics(out)
    assert [row["step"] for row in resumed] == [0, 1, 2, 3, 4]
    _assert_same_steps(resumed, _metrics(reference_run), steps=(3, 4))
    assert sorted(os.listdir(checkpoints)) == ["iter_0000004", "latest"]
    # Two more Adam steps per training step after the resume (the optimizer's step count came back): same weights.
    resumed_weights, reference = _hf_tensors(os.path.join(out, "hf")), _hf_tensors(os.path.join(reference_run, "hf"))
    assert resumed_weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed_weights[name], reference[name]), name


def test_offloaded_run_equals_reference(reference_run, inputs, tmp_path):
    """Params, grads and optimizer state on the host between updates change nothing: same metrics, same weights."""
    out = str(tmp_path / "run")
    _train(_overrides(
        inputs, out, "actor.megatron.expert_model_parallel_size=2", "actor.megatron.param_offload=true",
        "actor.megatron.grad_offload=true", "actor.megatron.optimizer_offload=true",
    ))  # fmt: skip
    _assert_same_steps(_metrics(out), _metrics(reference_run), steps=(0, 1, 2, 3, 4))
    offloaded, reference = _hf_tensors(os.path.join(out, "hf")), _hf_tensors(os.path.join(reference_run, "hf"))
    assert offloaded.keys() == reference.keys()
    for name in reference:
        assert torch.equal(offloaded[name], reference[name]), name


@pytest.mark.parametrize(
    "layout",
    [
        # TP=2 with sequence parallel; the experts split by ETP=2 (megatron-core never reduces expert grads with
        # EP=1 and ETP<TP, which the layout check rejects).
        ("tensor_model_parallel_size=2", "expert_model_parallel_size=1", "expert_tensor_parallel_size=2"),
        ("pipeline_model_parallel_size=2", "expert_model_parallel_size=1"),
    ],
    ids=["tp2", "pp2"],
)
def test_other_layouts_agree_with_expert_parallel_reference(layout, reference_run, inputs, tmp_path):
    """Every layout samples the same first batch from the same initial weights, so its first update and the
    validation after it must agree with the EP=2 reference up to float32 reduction order."""
    out = str(tmp_path / "run")
    _train(_overrides(
        inputs, out, *[f"actor.megatron.{setting}" for setting in layout], "trainer.total_steps=1",
        "trainer.save_freq=0", "trainer.export_hf_at_end=false",
    ))  # fmt: skip
    rows = _metrics(out)
    assert [row["step"] for row in rows] == [0, 1]
    assert rows[1]["rollout/logprob_diff"] < 1e-5
    _assert_same_steps(rows, _metrics(reference_run), steps=(0, 1), tol=1e-4)


def test_the_actor_waits_for_the_critic_warmup():
    """verl's ``critic_warmup <= global_steps`` (steps from 1): with a warm-up of 3 the critic trains alone in steps
    1-2, and the engine keeps the initial policy (version 0) until step 3's update."""
    from megatron_sapo.config import load_config
    from megatron_sapo.trainer import _actor_updates, _policy_version

    hf_config = os.path.join(REPO, "recipes", "qwen3_30b_a3b", "hf_config")
    config = load_config(None, ["algorithm.adv_estimator=gae", "trainer.critic_warmup=3"], check_paths=False,
                         hf_config_dir=hf_config, world_size=8)  # fmt: skip
    assert [_actor_updates(config, step) for step in (1, 2, 3, 4)] == [False, False, True, True]
    assert [_policy_version(config, step) for step in (0, 1, 2, 3, 4)] == [0, 0, 0, 3, 4]
    config.algorithm.adv_estimator = "grpo"  # no critic: the actor updates from step 1
    assert _actor_updates(config, 1)


def test_r3_replays_the_engine_routing(reference_run, inputs, tmp_path):
    """The recipe's R3: the trainer's old-log-prob pass replays the embedded server's routing token for token
    (agreement 1.0), so its log-probs equal the engine's (a misaligned routing, off by a position, a layer or a
    sample, would break both). Without replay the rollouts are the same; the updates are not: after the first
    optimizer step of a training step the trainer re-routes, where R3 keeps the rollout's routing."""
    reference = _metrics(reference_run)
    for row in reference[1:]:
        assert row["rollout/router_agreement"] == 1.0
        assert row["rollout/logprob_diff"] < 1e-5
        assert row["rollout_corr/kl"] == pytest.approx(0.0, abs=1e-5)
    out = str(tmp_path / "run")
    _train(_overrides(
        inputs, out, "actor.megatron.expert_model_parallel_size=2", "actor.router_replay.mode=disabled",
        "rollout.enable_return_routed_experts=true", "trainer.total_steps=1", "trainer.save_freq=0",
        "trainer.export_hf_at_end=false",
    ))  # fmt: skip
    rows = _metrics(out)
    assert [row["step"] for row in rows] == [0, 1]
    # Same weights on both sides in float32: the trainer's natural routing is the engine's.
    assert rows[1]["rollout/router_agreement"] == 1.0
    _assert_same_steps(rows, reference, steps=(0,))
    for key in ("reward/mean", "response_length/mean", "rollout/logprob_diff"):
        assert rows[1][key] == pytest.approx(reference[1][key], abs=1e-7)
    assert rows[1]["actor/grad_norm"] != pytest.approx(reference[1]["actor/grad_norm"], rel=1e-4)


def test_offload_frees_and_restores_buffers(inputs):
    result = torchrun("offload_check.py", "--hf-dir", inputs.hf_dir, "--train-file", inputs.train_file,
                      "actor.megatron.expert_model_parallel_size=2")  # fmt: skip
    assert result["resident"]["params"] > 0 and result["resident"]["grads"] > 0
    assert result["offloaded"] == {"params": 0, "grads": 0}
    assert result["reloaded"] == result["resident"]
    assert result["host_copy_bytes"] == result["resident"]["params"]
    assert result["params_restored"] and result["grads_zero_after_reload"]


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("actor.tau_neg=0", "actor.tau_neg=0.0: must be > 0"),
        ("actor.policy_loss.loss_mode=sapox", "actor.policy_loss.loss_mode='sapox': use one of"),
        ("algorithm.adv_estimator=gae critic.cliprange_value=0", "critic.cliprange_value=0.0: must be > 0"),
        ("algorithm.adv_estimator=gae critic.policy_loss.loss_mode=vanilla",
         "critic.policy_loss.loss_mode=vanilla: the critic has no policy loss"),
        ("algorithm.adv_estimator=gae critic.ppo_mini_batch_size=3",
         "data.train_batch_size=4 is not a multiple of critic.ppo_mini_batch_size=3"),
        ("algorithm.adv_estimator=gae critic.loss_agg_mode=token-sum", "critic.loss_agg_mode='token-sum': use one"),
        ("algorithm.adv_estimator=gae critic.model.path=/no/such", "critic.model.path=/no/such: no config.json"),
        ("trainer.critic_warmup=-1", "trainer.critic_warmup=-1: must be >= 0"),
        ("algorithm.adv_estimator=gae algorithm.lam=1.5", "algorithm.lam=1.5: must be in [0, 1]"),
        ("actor.ppo_mini_batch_size=5", "data.train_batch_size=4 is not a multiple of actor.ppo_mini_batch_size=5"),
        ("actor.megatron.expert_model_parallel_size=3", "actor.megatron."),
        ("actor.tau_poss=1.0", "actor.tau_poss: unknown key"),
        ("actor.tau_pos=abc", "actor.tau_pos"),
        ("rollout.temperature=0", "rollout.temperature=0.0: must be > 0"),
        ("data.max_response_length=4096", "actor.max_tokens_per_micro_batch=2048 is below"),
        ("trainer.resume=/no/such/checkpoint", "trainer.resume='/no/such/checkpoint'"),
        ("model.path=/no/such/model", "model.path=/no/such/model: no such folder"),
        ("data.val_files=[/no/such/val.jsonl]", "data.val_files: /no/such/val.jsonl does not exist"),
        ("trainer.test_freq=-1", "trainer.test_freq=-1: must be >= 0"),
        ("rollout.val_kwargs.temperature=-1", "rollout.val_kwargs.temperature=-1.0: must be >= 0"),
    ],
)
def test_bad_config_is_one_clear_error(override, expected, inputs, tmp_path):
    from megatron_sapo.config import load_config
    from megatron_sapo.errors import InputError

    with pytest.raises(InputError) as error:
        load_config(RECIPE, [*_overrides(inputs, str(tmp_path / "run")), *override.split()], world_size=2)
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_verl_prefixed_overrides_are_accepted(inputs, tmp_path):
    from megatron_sapo.config import load_config

    verl_style = ["actor_rollout_ref.actor.tau_neg=1.2", "actor_rollout_ref.rollout.n=8"]
    config = load_config(RECIPE, [*_overrides(inputs, str(tmp_path / "run")), *verl_style], world_size=2)
    assert config.actor.tau_neg == 1.2 and config.rollout.n == 8


def test_bad_config_exits_before_any_work(inputs, tmp_path):
    out = str(tmp_path / "run")
    overrides = _overrides(inputs, out, "actor.tau_neg=-1")
    expected = "error: actor.tau_neg=-1.0: must be > 0 (paper: 1.05)"

    # Plain python: exit status 2 and that one line, nothing else.
    proc = subprocess.run([sys.executable, "-m", "megatron_sapo.train", "--config", RECIPE, *overrides],
                          capture_output=True, text=True, timeout=300, env={**_env(), "WORLD_SIZE": "2"})  # fmt: skip
    assert (proc.returncode, proc.stderr.strip()) == (2, expected)

    # Under torchrun every rank stops the same way (torchrun then reports the failed ranks in its own words).
    proc = subprocess.run(_train_command(overrides), capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [expected]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert not os.path.exists(out)
