"""compute_advantages and the overlong penalty against loops over plain Python numbers (statistics, math)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_sapo.errors import InputError
from megatron_sapo.loss import apply_overlong_penalty, compute_advantages

# Four prompts: a group of 4, a group of 3 that all scored the same, a group of 2, a singleton.
GROUPS = ["p0", "p1", "p0", "p2", "p0", "p1", "p3", "p2", "p0", "p1"]
SCORES = [1.0, 0.5, 0.0, 2.0, 1.0, 0.5, 0.7, -1.0, 0.25, 0.5]
LENGTHS = [5, 3, 6, 1, 4, 6, 2, 5, 3, 6]


def make_mask(lengths=LENGTHS, width=6) -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


def run(estimator, **kwargs) -> torch.Tensor:
    defaults = {
        "rewards": torch.tensor(SCORES, dtype=torch.float64),
        "response_mask": make_mask(),
        "group_index": GROUPS,
    }
    return compute_advantages(estimator, **{**defaults, **kwargs})


def broadcast(per_seq: list[float], mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor(
        [[a if m else 0.0 for m in row] for a, row in zip(per_seq, mask.tolist(), strict=True)], dtype=torch.float64
    )


def whiten(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    on = [v for row, mrow in zip(values, mask.tolist(), strict=True) for v, m in zip(row, mrow, strict=True) if m]
    mean, var = statistics.fmean(on), statistics.variance(on)
    return torch.tensor(
        [
            [(v - mean) / math.sqrt(var + 1e-8) if m else 0.0 for v, m in zip(row, mrow, strict=True)]
            for row, mrow in zip(values, mask.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo(norm_by_std):
    expected = []
    for g, s in zip(GROUPS, SCORES, strict=True):
        group = [SCORES[j] for j in range(len(SCORES)) if GROUPS[j] == g]
        if len(group) == 1:
            expected.append(s)  # no baseline for a lone response
        elif norm_by_std:
            expected.append((s - statistics.fmean(group)) / (statistics.stdev(group) + 1e-6))
        else:
            expected.append(s - statistics.fmean(group))
    advantages = run("grpo", norm_by_std=norm_by_std)
    torch.testing.assert_close(advantages, broadcast(expected, make_mask()), rtol=1e-12, atol=1e-12)
    assert torch.all(advantages[[1, 5, 9]] == 0)  # p1's scores are all equal


def test_grpo_accepts_integer_group_tensor():
    ids = {"p0": 17, "p1": 3, "p2": 99, "p3": -2}
    as_tensor = run("grpo", group_index=torch.tensor([ids[g] for g in GROUPS]))
    torch.testing.assert_close(as_tensor, run("grpo"), rtol=0, atol=0)


def test_rloo():
    expected = []
    for i, g in enumerate(GROUPS):
        others = [SCORES[j] for j in range(len(SCORES)) if GROUPS[j] == g and j != i]
        expected.append(SCORES[i] - statistics.fmean(others) if others else SCORES[i])
    torch.testing.assert_close(run("rloo"), broadcast(expected, make_mask()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus(gamma):
    mask = make_mask()
    returns = [
        [s * gamma ** (n - 1 - t) if t < n else 0.0 for t in range(6)] for s, n in zip(SCORES, LENGTHS, strict=True)
    ]
    expected = whiten(returns, mask)
    torch.testing.assert_close(run("reinforce_plus_plus", gamma=gamma), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8)])
def test_gae_skips_non_response_tokens(gamma, lam):
    mask = make_mask()
    mask[0, 2] = 0  # an observation inside response 0
    mask[6] = 0  # an empty response
    values = torch.randn(len(SCORES), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw = [[0.0] * 6 for _ in SCORES]
    for i, (score, row) in enumerate(zip(SCORES, mask.tolist(), strict=True)):
        positions = [t for t in range(6) if row[t]]
        next_value, next_adv = 0.0, 0.0
        for k in reversed(range(len(positions))):
            t = positions[k]
            reward = score if k == len(positions) - 1 else 0.0
            delta = reward + gamma * next_value - values[i, t].item()
            raw[i][t] = next_adv = delta + gamma * lam * next_adv
            next_value = values[i, t].item()
    advantages = run("gae", response_mask=mask, values=values, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, whiten(raw, mask), rtol=1e-12, atol=1e-12)


def test_overlong_penalty():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    lengths = torch.tensor([10, 60, 61, 80, 90, 100])
    # L = 100, B = 40: no penalty up to 60, then -(l - 60) / 40 * 0.5.
    expected = [1.0, 1.0, 1.0 - 0.5 / 40, 0.0 - 0.5 * 20 / 40, 1.0 - 0.5 * 30 / 40, 1.0 - 0.5]
    shaped = apply_overlong_penalty(
        rewards, lengths, max_response_length=100, overlong_buffer_len=40, overlong_penalty_factor=0.5
    )
    torch.testing.assert_close(shaped, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "estimator,kwargs,field",
    [
        ("ppo", {}, "estimator"),
        ("gae", {}, "values"),
        ("gae", {"values": torch.zeros(10, 5)}, "values"),
        ("grpo", {"group_index": None}, "group_index"),
        ("rloo", {"group_index": GROUPS[:-1]}, "group_index"),
        ("grpo", {"rewards": torch.zeros(10, 6)}, "rewards"),
        ("grpo", {"response_mask": torch.ones(10)}, "response_mask"),
        ("reinforce_plus_plus", {"gamma": 1.5}, "gamma"),
        ("gae", {"values": torch.zeros(10, 6), "lam": -0.1}, "lam"),
        ("reinforce_plus_plus", {"response_mask": make_mask([1] + [0] * 9)}, "response_mask"),
    ],
)
def test_bad_input_raises(estimator, kwargs, field):
    with pytest.raises(InputError, match=f"^{field}: "):
        run(estimator, **kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"overlong_buffer_len": 0}, "overlong_buffer_len"),
        ({"overlong_buffer_len": 200}, "overlong_buffer_len"),
        ({"overlong_penalty_factor": -1.0}, "overlong_penalty_factor"),
        ({"response_lengths": torch.tensor([1, 2])}, "response_lengths"),
    ],
)
def test_overlong_bad_input_raises(kwargs, field):
    args = {
        "rewards": torch.zeros(3),
        "response_lengths": torch.tensor([1, 2, 3]),
        "max_response_length": 100,
        "overlong_buffer_len": 10,
        **kwargs,
    }
    with pytest.raises(InputError, match=f"^{field}: "):
        apply_overlong_penalty(args.pop("rewards"), args.pop("response_lengths"), **args)
