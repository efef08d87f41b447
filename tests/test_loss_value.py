"""GAE advantages/returns, the clipped value loss and the explained variance against plain fp64 Python loops."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_sapo.errors import InputError
from megatron_sapo.loss import aggregate_loss, explained_variance, gae_advantages, value_loss

SCORES = [1.0, 0.0, 0.5, -1.0, 2.0]
LENGTHS = [4, 6, 1, 3, 0]  # one one-token response, one empty row (padding only)
WIDTH = 6


def mask_of(lengths=LENGTHS) -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(WIDTH)] for n in lengths], dtype=torch.float64)


def loop_gae(scores, values, mask, gamma, lam):
    """Per response: TD errors over its tokens (score on the last one, V = 0 after it), accumulated backwards."""
    advantages = [[0.0] * WIDTH for _ in scores]
    returns = [[0.0] * WIDTH for _ in scores]
    for i, score in enumerate(scores):
        positions = [t for t in range(WIDTH) if mask[i][t]]
        next_value = next_adv = 0.0
        for k in reversed(range(len(positions))):
            t = positions[k]
            reward = score if k == len(positions) - 1 else 0.0
            delta = reward + gamma * next_value - values[i][t]
            next_adv = delta + gamma * lam * next_adv
            advantages[i][t] = next_adv
            returns[i][t] = next_adv + values[i][t]
            next_value = values[i][t]
    on = [a for row, m in zip(advantages, mask) for a, keep in zip(row, m) if keep]
    mean, var = statistics.fmean(on), statistics.variance(on)
    whitened = [[(a - mean) / (var + 1e-8) ** 0.5 if keep else 0.0 for a, keep in zip(row, m)]
                for row, m in zip(advantages, mask)]  # fmt: skip
    return whitened, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.7, 0.3)])
def test_gae_advantages_and_returns_match_loops(gamma, lam):
    mask = mask_of()
    mask[1, 2] = 0  # an observation token inside response 1: skipped by the recursion
    values = torch.randn(len(SCORES), WIDTH, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    advantages, returns = gae_advantages(torch.tensor(SCORES, dtype=torch.float64), values, mask, gamma=gamma, lam=lam)
    expected_adv, expected_ret = loop_gae(SCORES, values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_adv, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, torch.tensor(expected_ret, dtype=torch.float64), rtol=0, atol=1e-12)
    # gamma = lam = 1: every return is the score (the TD errors telescope), whatever the values.
    if gamma == lam == 1.0:
        for i, n in enumerate(LENGTHS):
            assert returns[i, :n].tolist() == pytest.approx([SCORES[i]] * n if i != 1 else [SCORES[1]] * n, abs=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_matches_plain_formula(mode):
    g = torch.Generator().manual_seed(2)
    mask = mask_of()
    old = torch.randn(len(SCORES), WIDTH, generator=g, dtype=torch.float64)
    values = old + torch.randn(len(SCORES), WIDTH, generator=g, dtype=torch.float64)  # many beyond the clip range
    returns = torch.randn(len(SCORES), WIDTH, generator=g, dtype=torch.float64)
    clip = 0.5
    loss, metrics = value_loss(values, old, returns, mask, cliprange_value=clip, loss_agg_mode=mode)
    per_token, clipped_count, tokens = [], 0, 0
    for i in range(len(SCORES)):
        row = []
        for t in range(WIDTH):
            v, vo, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
            vc = min(max(v, vo - clip), vo + clip)
            row.append(max((v - r) ** 2, (vc - r) ** 2))
            if mask[i, t]:
                tokens += 1
                clipped_count += (vc - r) ** 2 > (v - r) ** 2
        per_token.append(row)
    if mode == "token-mean":
        expected = 0.5 * sum(x for row, m in zip(per_token, mask.tolist()) for x, k in zip(row, m) if k) / tokens
    else:
        rows = [[x for x, k in zip(row, m) if k] for row, m in zip(per_token, mask.tolist())]
        expected = 0.5 * statistics.fmean(statistics.fmean(r) for r in rows if r)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["vf_clipfrac"].item() == pytest.approx(clipped_count / tokens, rel=1e-12)
    assert 0 < clipped_count < tokens
    assert metrics["vpred_mean"].item() == pytest.approx(values[mask.bool()].mean().item(), rel=1e-12)
    # Inside the clip range the loss is plain 0.5 * squared error.
    near = old + 0.1
    plain, _ = value_loss(near, old, returns, mask, cliprange_value=clip, loss_agg_mode=mode)
    assert plain.item() == pytest.approx(0.5 * aggregate_loss((near - returns) ** 2, mask, mode).item(), rel=1e-12)


def test_explained_variance_and_bad_clip():
    g = torch.Generator().manual_seed(3)
    mask = mask_of()
    returns = torch.randn(len(SCORES), WIDTH, generator=g, dtype=torch.float64)
    values = returns + 0.1 * torch.randn(len(SCORES), WIDTH, generator=g, dtype=torch.float64)
    on = mask.bool()
    r, v = returns[on].tolist(), values[on].tolist()
    expected = 1 - statistics.variance([a - b for a, b in zip(r, v)]) / (statistics.variance(r) + 1e-5)
    assert explained_variance(values, returns, mask) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(InputError, match="^cliprange_value: "):
        value_loss(values, values, returns, mask, cliprange_value=0.0)
