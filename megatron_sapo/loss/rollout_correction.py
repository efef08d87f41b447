"""Train-inference mismatch control: verl's ``algorithm.rollout_correction`` (importance weights and rejection
sampling between the trainer's and the rollout engine's log-probs) and slime's icepop.

Everything is a function of ``log_ratio = train_log_probs - rollout_log_probs`` per response token (``[batch,
response_len]``), where "train" is the trainer's old policy (or, in bypass mode, the current policy, detached) and
"rollout" the engine's log-probs of the same sampled tokens. The engine sampled the tokens, so
``w = pi_train / pi_rollout`` is the importance weight that turns the engine's samples into the trainer's.

- ``rollout_is`` (the weight multiplies each token's policy-gradient term):
  ``token``: ``min(w_t, threshold)``; ``sequence``: ``min(prod_t w_t, threshold)`` for every token of the sequence;
  ``icepop`` (slime): ``w_t`` where ``lower <= w_t <= threshold``, 0 elsewhere.
- ``rollout_rs`` (rejection: the token, or the whole sequence, leaves the loss and its denominator). ``k1`` options
  bound the ratio ``lower <= w <= threshold``: ``token``/``token_k1`` per token, ``sequence``/``seq_sum_k1`` on the
  sequence ratio ``prod_t w_t``, ``geometric``/``seq_mean_k1`` on its geometric mean ``exp(mean_t log w_t)``.
  ``k2``/``k3`` options bound a divergence estimate from above, ``<= threshold``: per token
  (``token_k2/k3``), summed (``seq_sum_k2/k3``), averaged (``seq_mean_k2/k3``) or maximal (``seq_max_k2/k3``)
  over the sequence, with ``k2 = (log w)^2 / 2`` and ``k3 = w - 1 - log w``.

Log-ratios are clamped to ``±SAFETY_BOUND`` before ``exp``, as verl does. Rows without response tokens get weight 1
and are never rejected (they add nothing to the loss anyway).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from megatron_sapo.errors import InputError

SAFETY_BOUND = 20.0
IS_MODES = ("token", "sequence", "icepop")
# name -> (level, statistic); level "token" or how a sequence reduces its per-token statistic.
RS_MODES: dict[str, tuple[str, str]] = {
    "token": ("token", "k1"),
    "sequence": ("sum", "k1"),
    "geometric": ("mean", "k1"),
    "token_k1": ("token", "k1"),
    "token_k2": ("token", "k2"),
    "token_k3": ("token", "k3"),
    "seq_sum_k1": ("sum", "k1"),
    "seq_sum_k2": ("sum", "k2"),
    "seq_sum_k3": ("sum", "k3"),
    "seq_mean_k1": ("mean", "k1"),
    "seq_mean_k2": ("mean", "k2"),
    "seq_mean_k3": ("mean", "k3"),
    "seq_max_k2": ("max", "k2"),
    "seq_max_k3": ("max", "k3"),
}
PREFIX = "algorithm.rollout_correction."


class Correction(NamedTuple):
    weights: torch.Tensor  # [B, R] importance weight per token (1 without rollout_is), 0 off the response, detached
    loss_mask: torch.Tensor  # [B, R] response tokens that stay in the loss (rejection applied), float
    metrics: dict[str, torch.Tensor]  # 0-dim tensors; names as verl logs them under rollout_corr/


def check_rollout_correction(
    rollout_is: str | None,
    rollout_is_threshold: float,
    rollout_is_threshold_lower: float | None,
    rollout_rs: str | None,
    rollout_rs_threshold: float | None,
    rollout_rs_threshold_lower: float | None,
) -> None:
    """One ``InputError`` line for the first nonsensical setting."""
    if rollout_is is not None:
        if rollout_is not in IS_MODES:
            raise InputError(f"{PREFIX}rollout_is={rollout_is!r}: use null, {', '.join(IS_MODES)}")
        if not rollout_is_threshold > 0:
            raise InputError(f"{PREFIX}rollout_is_threshold={rollout_is_threshold}: must be > 0 (verl: 2.0)")
        lower = _lower(rollout_is_threshold, rollout_is_threshold_lower)
        if rollout_is == "icepop" and not 0 < lower <= 1 <= rollout_is_threshold:
            raise InputError(
                f"{PREFIX}rollout_is_threshold_lower/rollout_is_threshold = {lower}/{rollout_is_threshold}: icepop "
                "needs 0 < lower <= 1 <= threshold (IcePop: 0.5 and 5.0)"
            )
    if rollout_rs is not None:
        if "," in rollout_rs:
            raise InputError(f"{PREFIX}rollout_rs={rollout_rs!r}: give one option, e.g. token_k1 or seq_mean_k3")
        if rollout_rs not in RS_MODES:
            raise InputError(f"{PREFIX}rollout_rs={rollout_rs!r}: use null or one of {', '.join(RS_MODES)}")
        if rollout_rs_threshold is None or not rollout_rs_threshold > 0:
            raise InputError(f"{PREFIX}rollout_rs_threshold={rollout_rs_threshold}: rollout_rs needs a threshold > 0")
        if RS_MODES[rollout_rs][1] == "k1":
            lower = _lower(rollout_rs_threshold, rollout_rs_threshold_lower)
            if not 0 < lower <= rollout_rs_threshold:
                raise InputError(
                    f"{PREFIX}rollout_rs_threshold_lower={lower}: must be in (0, rollout_rs_threshold="
                    f"{rollout_rs_threshold}] (default 1 / rollout_rs_threshold)"
                )
        elif rollout_rs_threshold_lower is not None:
            raise InputError(
                f"{PREFIX}rollout_rs_threshold_lower: {rollout_rs} bounds a divergence from above only; "
                "set it to null (lower bounds apply to the ratio options token, sequence, geometric, *_k1)"
            )


def _lower(threshold: float, lower: float | None) -> float:
    return 1.0 / threshold if lower is None else lower


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, 0)


def _sequence_stat(per_token: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, 1]`` sum / mean / max of ``per_token`` over each row's response tokens (0 for an empty row)."""
    if how == "sum":
        return _masked(per_token, mask).sum(-1, keepdim=True)
    if how == "mean":
        return _masked(per_token, mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    peak = per_token.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    return torch.where(mask.any(-1, keepdim=True), peak, 0)


def importance_weights(
    log_ratio: torch.Tensor, mask: torch.Tensor, mode: str, threshold: float, lower: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, altered)``: the ``rollout_is`` weights and where truncation (or icepop's cut) changed them."""
    if mode == "sequence":
        raw = torch.exp(_sequence_stat(log_ratio, mask, "sum").clamp(-SAFETY_BOUND, SAFETY_BOUND)).expand_as(log_ratio)
    else:
        raw = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    if mode == "icepop":
        inside = (raw >= _lower(threshold, lower)) & (raw <= threshold)
        weights = torch.where(inside, raw, 0)
        altered = ~inside
    else:
        weights = raw.clamp(max=threshold)
        altered = raw > threshold
    return _masked(weights, mask).detach(), altered & mask


def rejection_mask(
    log_ratio: torch.Tensor, mask: torch.Tensor, mode: str, threshold: float, lower: float | None = None
) -> torch.Tensor:
    """Boolean ``[B, R]``: response tokens that ``rollout_rs`` keeps."""
    level, stat = RS_MODES[mode]
    lr = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    per_token = {"k1": lr, "k2": 0.5 * lr.square(), "k3": torch.exp(lr) - 1 - lr}[stat]
    value = per_token if level == "token" else _sequence_stat(per_token, mask, level)
    if stat == "k1":  # bounds on the ratio, compared in log space
        keep = (value >= math.log(_lower(threshold, lower))) & (value <= math.log(threshold))
    else:
        keep = value <= threshold
    return keep.expand_as(mask) & mask


def mismatch_metrics(train_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor) -> dict:
    """verl's off-policy diagnostics over response tokens: ``kl`` (k1 estimate of KL(rollout || train) from the
    engine's samples), ``k3_kl`` (``w - 1 - log w``, non-negative) and ``log_ppl_diff`` (mean over non-empty
    sequences of the trainer's minus the engine's log-perplexity)."""
    count = mask.sum().clamp(min=1).to(train_log_probs.dtype)
    lr = (train_log_probs - rollout_log_probs).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    rows = mask.any(-1)
    seq_gap = _sequence_stat(-lr, mask, "mean").squeeze(-1)  # -mean(train) - -mean(rollout)
    return {
        "kl": _masked(-lr, mask).sum() / count,
        "k3_kl": _masked(torch.exp(lr) - 1 - lr, mask).sum() / count,
        "log_ppl_diff": _masked(seq_gap, rows).sum() / rows.sum().clamp(min=1),
    }


def rollout_correction(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rollout_is: str | None = None,
    rollout_is_threshold: float = 2.0,
    rollout_is_threshold_lower: float | None = None,
    rollout_rs: str | None = None,
    rollout_rs_threshold: float | None = None,
    rollout_rs_threshold_lower: float | None = None,
) -> Correction:
    """Weights, the loss mask after rejection, and the ``rollout_corr/`` metrics (see the module docstring).

    Metrics: ``kl``, ``k3_kl``, ``log_ppl_diff`` (mismatch, always), ``rollout_is_mean``/``rollout_is_max``
    (weights over response tokens) and ``rollout_is_ratio_fraction_high`` (truncated, or cut by icepop) with
    ``rollout_is``, ``rollout_rs_masked_fraction`` (tokens) and ``rollout_rs_seq_masked_fraction`` (sequences with a
    rejected token) with ``rollout_rs``. Token fractions are over response tokens, sequence ones over non-empty rows.
    """
    check_rollout_correction(rollout_is, rollout_is_threshold, rollout_is_threshold_lower, rollout_rs,
                             rollout_rs_threshold, rollout_rs_threshold_lower)  # fmt: skip
    mask = response_mask.bool()
    with torch.no_grad():
        log_ratio = train_log_probs.detach().double() - rollout_log_probs.detach().double()
        metrics = mismatch_metrics(train_log_probs.detach().double(), rollout_log_probs.detach().double(), mask)
        count = mask.sum().clamp(min=1).double()
        weights = mask.double()
        if rollout_is is not None:
            weights, altered = importance_weights(
                log_ratio, mask, rollout_is, rollout_is_threshold, rollout_is_threshold_lower
            )
            metrics["rollout_is_mean"] = weights.sum() / count
            metrics["rollout_is_max"] = weights.amax() if weights.numel() else weights.new_zeros(())
            metrics["rollout_is_ratio_fraction_high"] = altered.sum() / count
        keep = mask
        if rollout_rs is not None:
            keep = rejection_mask(log_ratio, mask, rollout_rs, rollout_rs_threshold, rollout_rs_threshold_lower)
            rows = mask.any(-1)
            metrics["rollout_rs_masked_fraction"] = (mask & ~keep).sum() / count
            rejected_rows = (rows & (mask & ~keep).any(-1)).sum().double()
            metrics["rollout_rs_seq_masked_fraction"] = rejected_rows / rows.sum().clamp(min=1)
    dtype = train_log_probs.dtype
    return Correction(
        weights.to(dtype),
        keep.to(dtype),
        {name: value.to(dtype) for name, value in metrics.items()},
    )
