"""policy_loss against per-token formulas written out with `math`, in fp64: values, gradients, metrics, aggregation.

Every loss here is sum over tokens of (aggregation weight) * (per-token loss), and its gradient in log_probs[t] is
(aggregation weight) * d(per-token loss)/d log_probs[t], which the references below derive by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sapo.errors import InputError
from megatron_sapo.loss import LOSS_AGG_MODES, POLICY_LOSSES, PolicyTerms, loss_denominator, policy_loss

B, T = 6, 7
CLAMP = 20.0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Ratios spread around 1, some exactly 1 and some far outside the ±20 log clamp; advantages of both signs and
    zero; ragged masks with an empty row and a row with a hole; large garbage on padding."""
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    log_ratio = 3 * torch.rand(B, T, generator=gen, dtype=torch.float64) - 1.5
    log_ratio[0, 0] = log_ratio[2, 1] = 0.0
    log_ratio[0, 1], log_ratio[3, 2] = 30.0, -30.0
    advantages = torch.randn(B, T, generator=gen, dtype=torch.float64)
    advantages[4] = advantages[4, 0]  # a sequence-level advantage, as outcome rewards give
    advantages[0, 3] = advantages[5, 2] = 0.0
    mask = torch.zeros(B, T)
    for row, length in enumerate([7, 0, 3, 5, 7, 1]):
        mask[row, :length] = 1
    mask[3, 1] = 0  # e.g. a tool observation inside the response
    log_probs = old + log_ratio
    log_probs[mask == 0] = -1e4
    return {"log_probs": log_probs, "old_log_probs": old, "advantages": advantages, "response_mask": mask}


def agg_weights(mask: torch.Tensor, mode: str, seq_len_norm: float | None = None) -> list[list[float]]:
    """d(aggregate)/d(per-token loss): the plain definition of each aggregation mode."""
    lengths = [int(sum(row)) for row in mask.tolist()]
    tokens, seqs = sum(lengths), sum(1 for n in lengths if n > 0)
    norm = T if seq_len_norm is None else seq_len_norm
    weights = []
    for row, n in zip(mask.tolist(), lengths, strict=True):
        per_token = {
            "token-mean": 1 / tokens,
            "seq-mean-token-sum": 1 / seqs,
            "seq-mean-token-mean": 1 / (seqs * n) if n else 0.0,
            "seq-mean-token-sum-norm": 1 / (seqs * norm),
        }[mode]
        weights.append([per_token * m for m in row])
    return weights


def seq_log_ratios(batch) -> list[float]:
    out = []
    for lp, old, m in zip(
        batch["log_probs"].tolist(), batch["old_log_probs"].tolist(), batch["response_mask"].tolist(), strict=True
    ):
        diffs = [a - b for a, b, k in zip(lp, old, m, strict=True) if k]
        out.append(sum(diffs) / len(diffs) if diffs else 0.0)
    return out


def reference_terms(mode: str, batch, params: dict) -> tuple[list, list, list, list]:
    """Per token: (loss, d loss / d log_probs, ratio, gradient weight), by hand."""
    lp, old, adv = (batch[k].tolist() for k in ("log_probs", "old_log_probs", "advantages"))
    seq = seq_log_ratios(batch)
    out = [[[None] * T for _ in range(B)] for _ in range(4)]
    for i in range(B):
        for t in range(T):
            log_r = seq[i] if mode in ("sapo_seq", "gspo") else lp[i][t] - old[i][t]
            live = abs(log_r) < CLAMP  # past the clamp the ratio is constant: no gradient
            r = math.exp(max(-CLAMP, min(CLAMP, log_r)))
            a = adv[i][t]
            if mode in ("sapo", "sapo_seq"):
                tau = params.get("tau_pos", 1.0) if a > 0 else params.get("tau_neg", 1.05)
                p = sigmoid(tau * (r - 1))
                loss, weight = -a * 4 * p / tau, 4 * p * (1 - p)
            else:
                low, high = params["clip_ratio_low"], params["clip_ratio_high"]
                c = params.get("clip_ratio_c") if mode == "vanilla" else None
                loss = -min(r * a, min(max(r, 1 - low), 1 + high) * a)
                if a > 0:
                    weight = float(r < 1 + high)
                elif a < 0:
                    weight = float(r > 1 - low and (c is None or r < c))
                    if c is not None:
                        loss = min(loss, -a * c)
                else:
                    weight = 1.0
            out[0][i][t], out[2][i][t], out[3][i][t] = loss, r, weight
            # d(ratio)/d(log_probs[t]) = ratio for the token ratio and (straight-through) for the sequence ratio.
            out[1][i][t] = -a * weight * r * live
    return tuple(out)


MODE_PARAMS = {
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "sapo_seq": {"tau_pos": 0.8, "tau_neg": 1.3},
    "vanilla": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0},
    "gspo": {"clip_ratio_low": 0.05, "clip_ratio_high": 0.08},
}


def dot(weights, values) -> float:
    return sum(w * v for wr, vr in zip(weights, values, strict=True) for w, v in zip(wr, vr, strict=True) if w)


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", list(MODE_PARAMS))
def test_loss_and_gradient_match_reference(mode, loss_agg_mode):
    batch = make_batch()
    params = MODE_PARAMS[mode]
    seq_len_norm = 10.0 if loss_agg_mode == "seq-mean-token-sum-norm" else None
    log_probs = batch["log_probs"].clone().requires_grad_()
    loss, metrics = policy_loss(
        mode, **{**batch, "log_probs": log_probs}, loss_agg_mode=loss_agg_mode, seq_len_norm=seq_len_norm, **params
    )
    loss.backward()

    ref_loss, ref_dloss, ref_ratio, ref_weight = reference_terms(mode, batch, params)
    weights = agg_weights(batch["response_mask"], loss_agg_mode, seq_len_norm)
    assert math.isclose(loss.item(), dot(weights, ref_loss), rel_tol=1e-12, abs_tol=1e-12)
    expected = [
        [w * d if w else 0.0 for w, d in zip(wr, dr, strict=True)] for wr, dr in zip(weights, ref_dloss, strict=True)
    ]
    torch.testing.assert_close(log_probs.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert torch.isfinite(log_probs.grad).all() and torch.isfinite(loss)
    assert math.isclose(metrics["pg_loss"].item(), loss.item(), rel_tol=1e-15)

    # Token metrics: plain means over response tokens.
    mask = batch["response_mask"].tolist()
    on = [(i, t) for i in range(B) for t in range(T) if mask[i][t]]
    ratios = [ref_ratio[i][t] for i, t in on]
    grad_weights = [ref_weight[i][t] for i, t in on]
    assert math.isclose(metrics["ratio_mean"].item(), sum(ratios) / len(on), rel_tol=1e-12)
    assert math.isclose(metrics["ratio_max"].item(), max(ratios), rel_tol=1e-12)
    assert math.isclose(metrics["grad_weight_mean"].item(), sum(grad_weights) / len(on), rel_tol=1e-12, abs_tol=1e-15)
    assert metrics["grad_weight_low_frac"].item() == pytest.approx(sum(w < 0.5 for w in grad_weights) / len(on))
    lp, old = batch["log_probs"].tolist(), batch["old_log_probs"].tolist()
    k3 = []
    for i, t in on:
        x = max(-CLAMP, min(CLAMP, lp[i][t] - old[i][t]))
        k3.append(max(-10.0, min(10.0, math.exp(x) - x - 1)))
    assert math.isclose(metrics["approx_kl"].item(), sum(k3) / len(on), rel_tol=1e-12)
    assert metrics["num_tokens"].item() == len(on)
    assert all(value.dim() == 0 and not value.requires_grad for value in metrics.values())


def test_sapo_gradient_weight_is_one_on_policy():
    # r = 1 everywhere: the gate's slope is exactly 1, so SAPO's gradient is the plain policy gradient -A / N.
    old = torch.randn(2, 5, dtype=torch.float64)
    log_probs = old.clone().requires_grad_()
    advantages = torch.tensor([[1.5] * 5, [-0.7] * 5], dtype=torch.float64)
    mask = torch.ones(2, 5)
    loss, metrics = policy_loss(
        "sapo", log_probs=log_probs, old_log_probs=old, advantages=advantages, response_mask=mask
    )
    loss.backward()
    assert metrics["grad_weight_mean"].item() == 1.0
    assert metrics["grad_weight_low_frac"].item() == 0.0
    torch.testing.assert_close(log_probs.grad, -advantages / 10, rtol=1e-15, atol=0)
    # The gate itself is sigmoid(0) * 4 / tau = 2 / tau.
    expected = -(5 * 1.5 * 2 / 1.0 - 5 * 0.7 * 2 / 1.05) / 10
    assert math.isclose(loss.item(), expected, rel_tol=1e-14)


def test_sapo_gate_decays_smoothly_off_policy():
    # The gradient weight 4 p (1 - p) falls monotonically as r moves away from 1 on either side, never hitting 0.
    log_ratio = torch.tensor([[0.0, 0.25, 0.5, 1.0, 2.0], [0.0, -0.25, -0.5, -1.0, -2.0]], dtype=torch.float64)
    weights = POLICY_LOSSES["sapo"](
        log_ratio, torch.zeros_like(log_ratio), torch.ones_like(log_ratio), None
    ).grad_weight
    assert torch.all(weights[:, 1:] < weights[:, :-1]) and torch.all(weights > 0)


def test_truncated_importance_sampling():
    batch = make_batch(1)
    gen = torch.Generator().manual_seed(11)
    rollout = batch["old_log_probs"] + torch.randn(B, T, generator=gen, dtype=torch.float64)
    log_probs = batch["log_probs"].clone().requires_grad_()
    old = batch["old_log_probs"].clone().requires_grad_()
    loss, metrics = policy_loss(
        "sapo",
        **{**batch, "log_probs": log_probs, "old_log_probs": old},
        rollout_log_probs=rollout,
        tis_cap=1.5,
    )
    loss.backward()
    ref_loss, ref_dloss, _, _ = reference_terms("sapo", batch, {})
    old_l, roll_l, mask = batch["old_log_probs"].tolist(), rollout.tolist(), batch["response_mask"].tolist()
    tis = [
        [min(math.exp(o - r), 1.5) for o, r in zip(orow, rrow, strict=True)]
        for orow, rrow in zip(old_l, roll_l, strict=True)
    ]
    weights = agg_weights(batch["response_mask"], "token-mean")
    tis_loss = [[x * w for x, w in zip(lr, tr, strict=True)] for lr, tr in zip(ref_loss, tis, strict=True)]
    assert math.isclose(loss.item(), dot(weights, tis_loss), rel_tol=1e-12)
    expected = [
        [a * d * w if a else 0.0 for a, d, w in zip(ar, dr, tr, strict=True)]
        for ar, dr, tr in zip(weights, ref_dloss, tis, strict=True)
    ]
    torch.testing.assert_close(log_probs.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    # The weight is a change of measure, not part of the objective: no gradient into old_log_probs through it.
    # (old_log_probs' only gradient is through the ratio, the negative of log_probs'.)
    torch.testing.assert_close(old.grad, -log_probs.grad, rtol=1e-12, atol=1e-14)
    on = [(i, t) for i in range(B) for t in range(T) if mask[i][t]]
    assert math.isclose(metrics["tis_weight_mean"].item(), sum(tis[i][t] for i, t in on) / len(on), rel_tol=1e-12)
    capped = sum(math.exp(old_l[i][t] - roll_l[i][t]) >= 1.5 for i, t in on) / len(on)
    assert 0 < capped < 1 and metrics["tis_capped_frac"].item() == pytest.approx(capped)


@pytest.mark.parametrize(
    "kl_type,value,slope",
    [
        ("k1", lambda d: d, lambda d: 1.0),
        ("kl", lambda d: d, lambda d: 1.0),
        ("k2", lambda d: 0.5 * d * d, lambda d: d),
        ("mse", lambda d: 0.5 * d * d, lambda d: d),
        ("k3", lambda d: math.exp(-d) + d - 1, lambda d: 1 - math.exp(-d)),
        ("low_var_kl", lambda d: math.exp(-d) + d - 1, lambda d: 1 - math.exp(-d)),
    ],
)
def test_kl_penalty(kl_type, value, slope):
    # d = log_probs - ref_log_probs; k3 = r - 1 - log r with r = pi_ref / pi = exp(-d).
    batch = make_batch(2)
    gen = torch.Generator().manual_seed(5)
    ref = batch["log_probs"] + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    log_probs = batch["log_probs"].clone().requires_grad_()
    without_kl = policy_loss("sapo", **batch, loss_agg_mode="seq-mean-token-mean")[0]
    loss, metrics = policy_loss(
        "sapo",
        **{**batch, "log_probs": log_probs},
        loss_agg_mode="seq-mean-token-mean",
        ref_log_probs=ref,
        kl_coef=0.3,
        kl_type=kl_type,
    )
    loss.backward()
    weights = agg_weights(batch["response_mask"], "seq-mean-token-mean")
    diffs = (batch["log_probs"] - ref).tolist()
    kl = dot(weights, [[value(d) for d in row] for row in diffs])
    assert math.isclose(metrics["kl_loss"].item(), kl, rel_tol=1e-12)
    assert math.isclose(loss.item(), without_kl.item() + 0.3 * kl, rel_tol=1e-12)
    _, ref_dloss, _, _ = reference_terms("sapo", batch, {})
    expected = [
        [w * (g + 0.3 * slope(d)) if w else 0.0 for w, g, d in zip(wr, gr, dr, strict=True)]
        for wr, gr, dr in zip(weights, ref_dloss, diffs, strict=True)
    ]
    torch.testing.assert_close(log_probs.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_entropy_bonus():
    batch = make_batch(3)
    entropy = torch.rand(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64).requires_grad_()
    without = policy_loss("vanilla", **batch, loss_agg_mode="seq-mean-token-sum")[0]
    loss, metrics = policy_loss(
        "vanilla", **batch, loss_agg_mode="seq-mean-token-sum", entropy=entropy, entropy_coef=0.01
    )
    loss.backward()
    weights = agg_weights(batch["response_mask"], "seq-mean-token-sum")
    mean_entropy = dot(weights, entropy.tolist())
    assert math.isclose(metrics["entropy"].item(), mean_entropy, rel_tol=1e-12)
    assert math.isclose(loss.item(), without.item() - 0.01 * mean_entropy, rel_tol=1e-12)
    torch.testing.assert_close(entropy.grad, -0.01 * torch.tensor(weights, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("mode", list(MODE_PARAMS))
def test_all_empty_micro_batch_is_zero_not_nan(mode):
    batch = make_batch()
    batch["response_mask"] = torch.zeros(B, T)
    log_probs = batch["log_probs"].clone().requires_grad_()
    for agg in LOSS_AGG_MODES:
        log_probs.grad = None
        loss, metrics = policy_loss(
            mode, **{**batch, "log_probs": log_probs}, loss_agg_mode=agg, entropy=torch.ones(B, T, dtype=torch.float64)
        )
        loss.backward()
        assert loss.item() == 0.0
        assert torch.all(log_probs.grad == 0)
        assert all(math.isfinite(v.item()) for v in metrics.values())


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_global_denominator_makes_micro_batch_losses_sum_to_the_batch_loss(loss_agg_mode):
    batch = make_batch(4)
    full = policy_loss("sapo", **batch, loss_agg_mode=loss_agg_mode)[0]
    micro_batches = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 2), slice(2, 6))]
    denominator = sum(loss_denominator(mb["response_mask"], loss_agg_mode) for mb in micro_batches)
    summed = sum(
        policy_loss("sapo", **mb, loss_agg_mode=loss_agg_mode, loss_denominator=denominator)[0] for mb in micro_batches
    )
    assert math.isclose(summed.item(), full.item(), rel_tol=1e-12)
    tokens, sequences = 7 + 0 + 3 + (5 - 1) + 7 + 1, 5  # make_batch's lengths, less the hole in row 3
    assert denominator.item() == (tokens if loss_agg_mode == "token-mean" else sequences)


def test_registry_adds_a_mode_with_one_function(monkeypatch):
    def reinforce(log_probs, old_log_probs, advantages, response_mask, *, scale: float = 1.0) -> PolicyTerms:
        ratio = torch.exp(log_probs - old_log_probs)
        return PolicyTerms(-scale * advantages * ratio, ratio.detach(), torch.ones_like(ratio))

    monkeypatch.setitem(POLICY_LOSSES, "reinforce", reinforce)
    batch = make_batch()
    batch["log_probs"] = batch["old_log_probs"].clone()
    loss, _ = policy_loss("reinforce", **batch, scale=2.0)
    mask = batch["response_mask"].bool()
    assert math.isclose(loss.item(), (-2.0 * batch["advantages"][mask]).mean().item(), rel_tol=1e-14)
    with pytest.raises(InputError, match="^tau_pos: not a parameter of loss_mode 'reinforce'; it takes scale$"):
        policy_loss("reinforce", **batch, tau_pos=1.0)


@pytest.mark.parametrize(
    "mode,kwargs,field",
    [
        ("sapo", {"tau_pos": 0.0}, "tau_pos"),
        ("sapo_seq", {"tau_neg": -1.0}, "tau_neg"),
        ("ppo", {}, "loss_mode"),
        ("sapo", {"loss_agg_mode": "token-sum"}, "loss_agg_mode"),
        ("sapo", {"clip_ratio_c": 3.0}, "clip_ratio_c"),
        ("vanilla", {"clip_ratio_c": 1.0}, "clip_ratio_c"),
        ("vanilla", {"clip_ratio_low": -0.1}, "clip_ratio_low/high"),
        ("sapo", {"advantages": torch.zeros(B, T + 1)}, "advantages"),
        ("sapo", {"log_probs": torch.zeros(B * T)}, "log_probs"),
        ("sapo", {"kl_coef": 0.1}, "kl_coef"),
        ("sapo", {"entropy_coef": 0.1}, "entropy_coef"),
        ("sapo", {"ref_log_probs": torch.zeros(B, T), "kl_type": "k4"}, "kl_type"),
        ("sapo", {"rollout_log_probs": torch.zeros(B, T), "tis_cap": 0.0}, "tis_cap"),
        ("sapo", {"loss_agg_mode": "seq-mean-token-sum-norm", "seq_len_norm": 0}, "seq_len_norm"),
    ],
)
def test_bad_input_raises_one_line_naming_the_field(mode, kwargs, field):
    batch = {**make_batch(), **kwargs}
    with pytest.raises(InputError, match=f"^{field}: ") as info:
        policy_loss(mode, **batch)
    assert "\n" not in str(info.value)
