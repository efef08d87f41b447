"""Scoring through the worker pool: user functions that raise, hang, crash or return garbage score 0 and are counted."""

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from megatron_sapo.errors import InputError
from megatron_sapo.rewards import RewardConfig, RewardManager, RewardSample, compute_rewards, score_of

USER_REWARD = textwrap.dedent(
    """
    import os
    import time

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        if solution_str == "raise":
            raise ValueError("cannot score this")
        if solution_str == "hang":
            time.sleep(3600)
        if solution_str == "crash":
            os._exit(3)
        if solution_str == "nan":
            return float("nan")
        if solution_str == "text":
            return "high"
        if solution_str == "dict":
            return {"score": 0.25, "acc": True}
        if data_source == "weighted":
            return extra_info["weight"] * (solution_str == ground_truth)
        return 1.0 if solution_str == ground_truth else 0.0

    async def async_score(data_source, solution_str, ground_truth, extra_info=None):
        return 1.0
    """
)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user_reward") / "my_reward.py"
    path.write_text(USER_REWARD)
    return str(path)


def test_failures_score_zero_are_counted_and_the_pool_recovers(reward_file, caplog):
    config = RewardConfig(type="custom", custom_function=f"{reward_file}:compute_score", timeout_s=1.0, num_workers=2)
    samples = [
        ("7", "7"),
        ("raise", "7"),
        ("8", "7"),
        ("hang", "7"),
        ("nan", "7"),
        ("text", "7"),
        ("dict", "7"),
        ("crash", "7"),
        RewardSample("5", "5", data_source="weighted", extra_info={"weight": 3}),
        ("7", "7"),
    ]
    with RewardManager(config) as manager, caplog.at_level(logging.WARNING, logger="megatron_sapo.rewards.workers"):
        scores, info = manager.compute_rewards(samples)
        assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 3.0, 1.0]
        # raise, nan, text and crash are errors; hang is a timeout; hang and crash each cost a worker.
        assert (info["num_samples"], info["num_errors"], info["num_timeouts"]) == (10, 4, 1)
        assert info["num_worker_restarts"] == 2
        assert info["time_s"] < 15
        assert "4 of 10 responses raised or returned a bad value and 1 timed out" in caplog.text
        assert "First error, response 1: ValueError: cannot score this (" in caplog.text
        assert "my_reward.py:" in caplog.text

        # The replaced workers serve the next step.
        scores, info = manager.compute_rewards([("5", "5"), ("6", "5"), ("raise", "5")])
        assert scores == [1.0, 0.0, 0.0]
        assert (info["num_errors"], info["num_timeouts"], info["num_worker_restarts"]) == (1, 0, 0)


def test_module_function_spec_in_workers_and_in_process(reward_file, monkeypatch):
    # Spawned workers inherit sys.path, so a module importable here is importable there.
    monkeypatch.syspath_prepend(os.path.dirname(reward_file))
    samples = [("7", "7"), ("raise", "7"), ("8", "7"), ("dict", "7")]
    for num_workers in (1, 0):
        config = RewardConfig(type="custom", custom_function="my_reward:compute_score", num_workers=num_workers)
        with RewardManager(config) as manager:
            scores, info = manager.compute_rewards(samples)
        assert scores == [1.0, 0.0, 0.0, 0.25]
        assert (info["num_errors"], info["num_timeouts"]) == (1, 0)


def test_the_trainer_process_does_not_import_the_reward_module(tmp_path):
    path = tmp_path / "heavy_reward.py"
    path.write_text("def f(data_source, solution_str, ground_truth, extra_info=None):\n    return 2.0\n")
    with RewardManager(RewardConfig(type="custom", custom_function=f"{path}:f", num_workers=1)) as manager:
        assert manager.compute_rewards([("a", "b")])[0] == [2.0]
    assert not [name for name in sys.modules if "heavy_reward" in name]


def test_in_process_math_reward_works_off_the_main_thread():
    # math-verify's own timeouts use signal.alarm, which raises outside the main thread; ours are off.
    manager = RewardManager(RewardConfig(type="math", num_workers=0))
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=manager.compute_rewards([("Answer: 7", "7")])))
    thread.start()
    thread.join()
    scores, info = result["out"]
    assert (scores, info["num_errors"]) == ([1.0], 0)


TRAINER = textwrap.dedent(
    """
    import sys
    from megatron_sapo.rewards import RewardConfig, RewardManager
    config = RewardConfig(type="custom", custom_function=sys.argv[1] + ":compute_score", timeout_s=600, num_workers=2)
    manager = RewardManager(config)
    print(" ".join(str(worker.process.pid) for worker in manager._workers), flush=True)
    manager.compute_rewards([("hang", "7"), ("hang", "7")])
    """
)


def test_workers_do_not_outlive_a_killed_trainer(reward_file):
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, reward_file], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in trainer.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(0.3)  # let both workers take a hanging response
    trainer.kill()
    trainer.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def test_builtin_rewards_through_the_shared_pool():
    samples = [("Answer: 7", "7"), ("Answer: 8", "7"), ("so \\boxed{\\frac{1}{2}}", "0.5"), ("7", 7)]
    scores, info = compute_rewards(samples, RewardConfig(type="math", num_workers=1))
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert (info["num_errors"], info["num_timeouts"]) == (0, 0)
    scores, _ = compute_rewards(samples, RewardConfig(type="exact_match", num_workers=1))
    assert scores == [0.0, 0.0, 0.0, 1.0]
    assert compute_rewards([], RewardConfig(type="math", num_workers=1)) == (
        [],
        {
            "num_samples": 0,
            "num_errors": 0,
            "num_timeouts": 0,
            "num_worker_restarts": 0,
            "time_s": pytest.approx(0, abs=1),
        },
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", r"^reward.custom_function='no_colon': expected 'package.module:function'"),
        ("{dir}/missing.py:f", r"^reward.custom_function: no such file .*missing.py"),
        ("json:no_such_function", r"^reward.custom_function: json has no function 'no_such_function'"),
        ("no_such_module_xyz:f", r"^reward.custom_function: cannot import 'no_such_module_xyz'"),
        ("{dir}/broken.py:f", r"^reward.custom_function: importing .*broken.py failed: ZeroDivisionError"),
        ("{reward_file}:async_score", r"is async; give a plain function"),
    ],
)
def test_bad_reward_functions_fail_at_start(tmp_path, reward_file, spec, message):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    spec = spec.format(dir=tmp_path, reward_file=reward_file)
    with pytest.raises(InputError, match=message):
        RewardManager(RewardConfig(type="custom", custom_function=spec))


def test_config_validation():
    with pytest.raises(InputError, match=r"^reward.type=custom needs reward.custom_function"):
        RewardConfig(type="custom")
    with pytest.raises(InputError, match=r"^reward.custom_function is set but reward.type='math'"):
        RewardConfig(type="math", custom_function="m:f")
    with pytest.raises(InputError, match=r"^reward.type='llm_judge': use one of math, exact_match, custom"):
        RewardConfig(type="llm_judge")
    with pytest.raises(InputError, match=r"^reward.timeout_s=0"):
        RewardConfig(timeout_s=0)
    with pytest.raises(InputError, match=r"^reward.num_workers=-1"):
        RewardConfig(num_workers=-1)


def test_score_of():
    assert score_of(True) == 1.0
    assert score_of(np.float32(0.5)) == 0.5
    assert score_of({"score": 2, "acc": 1}) == 2.0
    with pytest.raises(TypeError, match="without a 'score' key"):
        score_of({"acc": 1})
    with pytest.raises(TypeError, match="returned NoneType, not a number"):
        score_of(None)
    with pytest.raises(ValueError, match="returned inf"):
        score_of(float("inf"))
