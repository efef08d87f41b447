"""algorithm.rollout_correction against plain fp64 formulas written per token with ``math``; the SAPO objective's
aggregation against the paper's formula. (~2 s)"""

import math

import pytest
import torch

from megatron_sapo.errors import InputError
from megatron_sapo.loss import aggregate_loss, policy_loss, rollout_correction
from megatron_sapo.loss.rollout_correction import RS_MODES


def _batch(seed=0, rows=6, width=7):
    g = torch.Generator().manual_seed(seed)
    train = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3
    rollout = train + torch.randn(rows, width, generator=g, dtype=torch.float64) * 0.6
    lengths = [7, 3, 0, 5, 1, 6][:rows]  # row 2 is empty
    mask = torch.tensor([[j < n for j in range(width)] for n in lengths])
    return train, rollout, mask, lengths


def _rows(train, rollout, lengths):
    """Per row: the list of log w_t over its response tokens."""
    return [[float(train[i, j] - rollout[i, j]) for j in range(n)] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("mode", ["token", "sequence", "icepop"])
def test_importance_weights_match_plain_formulas(mode):
    train, rollout, mask, lengths = _batch()
    threshold, lower = (1.5, 0.7) if mode == "icepop" else (1.3, None)
    result = rollout_correction(train, rollout, mask, rollout_is=mode, rollout_is_threshold=threshold,
                                rollout_is_threshold_lower=lower)  # fmt: skip
    expected, altered = torch.zeros_like(train), 0
    for i, logs in enumerate(_rows(train, rollout, lengths)):
        for j, lw in enumerate(logs):
            if mode == "token":
                w = math.exp(lw)
                expected[i, j], altered = min(w, threshold), altered + (w > threshold)
            elif mode == "sequence":
                w = math.exp(sum(logs))
                expected[i, j], altered = min(w, threshold), altered + (w > threshold)
            else:
                w = math.exp(lw)
                inside = lower <= w <= threshold
                expected[i, j], altered = (w if inside else 0.0), altered + (not inside)
    torch.testing.assert_close(result.weights, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(result.loss_mask, mask.double())
    tokens = sum(lengths)
    assert math.isclose(float(result.metrics["rollout_is_ratio_fraction_high"]), altered / tokens, rel_tol=1e-12)
    assert math.isclose(float(result.metrics["rollout_is_mean"]), float(expected.sum()) / tokens, rel_tol=1e-12)
    assert math.isclose(float(result.metrics["rollout_is_max"]), float(expected.max()), rel_tol=1e-12)
    assert 0 < altered < tokens  # the batch exercises both sides of the threshold


def _plain_keep(logs, mode, threshold, lower):
    level, stat = RS_MODES[mode]
    if stat == "k1":
        stats = logs
    elif stat == "k2":
        stats = [0.5 * x * x for x in logs]
    else:
        stats = [math.exp(x) - 1 - x for x in logs]
    if level == "token":
        values = stats
    else:
        agg = {"sum": sum(stats), "mean": sum(stats) / max(len(stats), 1), "max": max(stats, default=0.0)}[level]
        values = [agg] * len(logs)
    if stat == "k1":
        return [lower <= math.exp(v) <= threshold for v in values]
    return [v <= threshold for v in values]


@pytest.mark.parametrize("mode", sorted(RS_MODES))
def test_rejection_matches_plain_formulas(mode):
    train, rollout, mask, lengths = _batch(seed=1)
    k1 = RS_MODES[mode][1] == "k1"
    level = RS_MODES[mode][0]
    threshold, lower = (1.6, 0.8) if k1 else ({"sum": 0.43, "max": 0.2}.get(level, 0.15), None)
    result = rollout_correction(train, rollout, mask, rollout_rs=mode, rollout_rs_threshold=threshold,
                                rollout_rs_threshold_lower=lower)  # fmt: skip
    expected = torch.zeros_like(train)
    rejected = rejected_rows = 0
    for i, logs in enumerate(_rows(train, rollout, lengths)):
        keep = _plain_keep(logs, mode, threshold, lower)
        expected[i, : len(keep)] = torch.tensor(keep, dtype=torch.float64)
        rejected += keep.count(False)
        rejected_rows += not all(keep)
    assert 0 < rejected < sum(lengths)  # the batch exercises both sides of the bound
    assert torch.equal(result.loss_mask, expected)
    assert torch.equal(result.weights, mask.double())  # no rollout_is: weight 1 on response tokens
    assert math.isclose(float(result.metrics["rollout_rs_masked_fraction"]), rejected / sum(lengths))
    assert math.isclose(float(result.metrics["rollout_rs_seq_masked_fraction"]), rejected_rows / 5)  # 5 non-empty


def test_lower_bound_defaults_to_reciprocal():
    log_w = torch.tensor([[math.log(0.45), math.log(0.55), math.log(1.9), math.log(2.1)]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    keep = rollout_correction(log_w, torch.zeros_like(log_w), mask, rollout_rs="token", rollout_rs_threshold=2.0)
    assert keep.loss_mask.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_mismatch_metrics_match_plain_formulas():
    train, rollout, mask, lengths = _batch(seed=2)
    metrics = rollout_correction(train, rollout, mask).metrics
    rows = [r for r in _rows(train, rollout, lengths) if r]
    flat = [x for r in rows for x in r]
    assert math.isclose(float(metrics["kl"]), sum(-x for x in flat) / len(flat), rel_tol=1e-12)
    assert math.isclose(float(metrics["k3_kl"]), sum(math.exp(x) - 1 - x for x in flat) / len(flat), rel_tol=1e-12)
    # log-ppl(train) - log-ppl(rollout) per sequence = mean(-train) - mean(-rollout), then a mean over sequences
    gap = sum(-sum(r) / len(r) for r in rows) / len(rows)
    assert math.isclose(float(metrics["log_ppl_diff"]), gap, rel_tol=1e-12)


def test_empty_batch_and_empty_rows_are_finite():
    empty = torch.zeros(3, 4, dtype=torch.float64)
    result = rollout_correction(empty, empty - 5, torch.zeros(3, 4, dtype=torch.bool), rollout_is="sequence",
                                rollout_rs="seq_max_k3", rollout_rs_threshold=0.1)  # fmt: skip
    assert all(math.isfinite(float(v)) for v in result.metrics.values())
    assert float(result.loss_mask.sum()) == 0 and float(result.weights.sum()) == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_weights_and_rejection_enter_the_sapo_loss(sign):
    """The corrected loss equals the plain per-token sum: weights scale each token's term; rejected tokens leave
    both the numerator and the token-mean denominator. Both signs of advantages."""
    train, rollout, mask, lengths = _batch(seed=3)
    log_probs = (train + 0.1).requires_grad_()
    advantages = sign * torch.linspace(0.2, 1.0, 6, dtype=torch.float64)[:, None].expand_as(train)
    corr = rollout_correction(train, rollout, mask, rollout_is="token", rollout_is_threshold=1.2,
                              rollout_rs="token", rollout_rs_threshold=2.5)  # fmt: skip
    loss, _ = policy_loss("sapo", log_probs=log_probs, old_log_probs=train, advantages=advantages,
                          response_mask=corr.loss_mask, rollout_is_weights=corr.weights)  # fmt: skip
    total = count = 0.0
    for i in range(6):
        for j in range(lengths[i]):
            if not corr.loss_mask[i, j]:
                continue
            r = math.exp(float(log_probs[i, j] - train[i, j]))
            a = float(advantages[i, j])
            tau = 1.0 if a > 0 else 1.05
            gate = 4 / tau / (1 + math.exp(-tau * (r - 1)))
            total += -gate * a * float(corr.weights[i, j])
            count += 1
    assert 0 < count < sum(lengths)
    assert math.isclose(float(loss), total / count, rel_tol=1e-10)


def test_sapo_paper_aggregation_is_seq_mean_token_mean():
    """SAPO's objective (arXiv 2511.20347, eq. for J): mean over the G responses of each response's token mean of the
    gated term; token-mean weights long responses more."""
    g = torch.Generator().manual_seed(4)
    per_token = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lengths = [6, 1, 3, 2]
    mask = torch.tensor([[j < n for j in range(6)] for n in lengths])
    paper = sum(sum(float(per_token[i, j]) for j in range(n)) / n for i, n in enumerate(lengths)) / len(lengths)
    token_mean = sum(float(per_token[i, j]) for i, n in enumerate(lengths) for j in range(n)) / sum(lengths)
    assert math.isclose(float(aggregate_loss(per_token, mask, "seq-mean-token-mean")), paper, rel_tol=1e-12)
    assert math.isclose(float(aggregate_loss(per_token, mask, "token-mean")), token_mean, rel_tol=1e-12)
    assert not math.isclose(paper, token_mean, rel_tol=1e-3)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rollout_is": "tokens"}, "rollout_is="),
        ({"rollout_is": "token", "rollout_is_threshold": 0.0}, "rollout_is_threshold="),
        ({"rollout_is": "icepop", "rollout_is_threshold": 0.9}, "rollout_is_threshold_lower/rollout_is_threshold"),
        ({"rollout_rs": "seq_max_k1", "rollout_rs_threshold": 2.0}, "rollout_rs="),
        ({"rollout_rs": "token_k1,seq_mean_k3", "rollout_rs_threshold": 2.0}, "rollout_rs="),
        ({"rollout_rs": "geometric"}, "rollout_rs_threshold="),
        ({"rollout_rs": "token", "rollout_rs_threshold": 2.0, "rollout_rs_threshold_lower": 3.0},
         "rollout_rs_threshold_lower="),
        ({"rollout_rs": "seq_mean_k3", "rollout_rs_threshold": 0.1, "rollout_rs_threshold_lower": 0.01},
         "rollout_rs_threshold_lower:"),
    ],
)  # fmt: skip
def test_nonsense_is_one_line_naming_the_key(kwargs, key):
    train, rollout, mask, _ = _batch()
    with pytest.raises(InputError) as error:
        rollout_correction(train, rollout, mask, **kwargs)
    message = str(error.value)
    assert "\n" not in message and f"algorithm.rollout_correction.{key}" in message
