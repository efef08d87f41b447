"""Policy-gradient losses: SAPO (arXiv 2511.20347) and the PPO/GSPO family, with the pieces they share.

A loss mode is one function ``(log_probs, old_log_probs, advantages, response_mask, **params) -> PolicyTerms`` and
one line in ``POLICY_LOSSES``. ``policy_loss`` looks the mode up and adds what every mode shares: truncated
importance sampling against the rollout engine's log-probs, a KL penalty to a reference policy, an entropy bonus,
aggregation to a scalar (see ``aggregation``), and metrics.

All tensors are ``[batch, response_len]``; ``response_mask`` is 1 on response tokens.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch

from megatron_sapo.errors import InputError
from megatron_sapo.loss.aggregation import aggregate_loss, check_loss_agg_mode, masked_mean

# exp(20) ~ 4.9e8: far enough to never bind on-policy, close enough that ratio * advantage stays finite in fp32.
LOG_RATIO_CLAMP = 20.0


class PolicyTerms(NamedTuple):
    """What a loss mode computes per token, before the shared pieces and aggregation."""

    loss: torch.Tensor  # surrogate loss per token, differentiable in log_probs
    ratio: torch.Tensor  # the importance ratio the surrogate uses (per token or per sequence), detached
    # d(surrogate)/d(ratio) relative to the unclipped PPO surrogate's: 1 on-policy, 0 where a clip cut the gradient,
    # in between where SAPO's gate softens it. Detached.
    grad_weight: torch.Tensor


# ---- importance ratios ----------------------------------------------------------------------------------------


def token_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """``log(pi / pi_old)`` per token, clamped to ``±LOG_RATIO_CLAMP`` (no gradient past the clamp)."""
    return torch.clamp(log_probs - old_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio, broadcast to every token of the sequence.

    Its value is the mean over the sequence's response tokens of ``log_probs - old_log_probs`` (the log of the
    geometric-mean ratio). Its gradient is GSPO-token's: ``sg[seq] + log_probs - sg[log_probs]``, so token t's
    gradient is its own ``d log_probs[t]`` scaled by the sequence ratio, which with equal advantages across the
    sequence and seq-mean-token-mean aggregation equals GSPO's sequence gradient.
    """
    mask = response_mask.bool()
    diff = torch.where(mask, log_probs - old_log_probs, 0)
    seq = diff.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    combined = seq.detach() + log_probs - log_probs.detach()
    return torch.clamp(combined, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


# ---- surrogates -----------------------------------------------------------------------------------------------


def soft_gate(log_ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> PolicyTerms:
    """SAPO: ``-A * sigmoid(tau (r - 1)) * 4 / tau``, tau = tau_pos where A > 0 else tau_neg.

    ``d gate / d r = 4 p (1 - p)`` with ``p = sigmoid(tau (r - 1))``: 1 at r = 1 (the plain policy gradient
    on-policy), decaying smoothly as r leaves 1 instead of dropping to 0 at a hard clip. tau_neg > tau_pos makes
    that decay faster for negative advantages: their updates raise the logits of many unsampled tokens at once,
    which the paper found the less stable side.
    """
    for name, tau in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if not tau > 0:
            raise InputError(f"{name}: {tau} must be > 0 (SAPO's gate temperature; the paper uses 1.0 / 1.05)")
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, ratio.new_tensor(tau_pos), ratio.new_tensor(tau_neg))
    p = torch.sigmoid(tau * (ratio - 1))
    gate = p * 4 / tau
    return PolicyTerms(-gate * advantages, ratio.detach(), (4 * p * (1 - p)).detach())


def clipped(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
) -> PolicyTerms:
    """PPO: ``max(-A r, -A clip(r, 1 - low, 1 + high))``; with ``clip_ratio_c``, dual clip bounds it by ``-A c``
    for A < 0 so that a very large ratio on a bad token cannot blow the loss up."""
    if not (clip_ratio_low >= 0 and clip_ratio_high >= 0):
        raise InputError(f"clip_ratio_low/high: {clip_ratio_low}/{clip_ratio_high} must be >= 0, e.g. 0.2 and 0.28")
    if clip_ratio_c is not None and not clip_ratio_c > 1:
        raise InputError(f"clip_ratio_c: {clip_ratio_c} must be > 1 (dual-clip bound, usually 3.0)")
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clip = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss = torch.maximum(unclipped, clip)
    # Inside the band the two are equal and the gradient flows through r; outside, the clamp cut it.
    passes = unclipped >= clip
    if clip_ratio_c is not None:
        bound = -advantages * clip_ratio_c
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        passes &= ~dual
    return PolicyTerms(loss, ratio.detach(), passes.to(ratio.dtype))


# ---- loss modes -----------------------------------------------------------------------------------------------


def sapo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> PolicyTerms:
    """SAPO's soft gate on the per-token ratio (as verl implements it)."""
    return soft_gate(token_log_ratio(log_probs, old_log_probs), advantages, tau_pos, tau_neg)


def sapo_seq(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> PolicyTerms:
    """SAPO's soft gate on the length-normalised sequence ratio (GSPO-style); pair it with seq-mean-token-mean."""
    return soft_gate(sequence_log_ratio(log_probs, old_log_probs, response_mask), advantages, tau_pos, tau_neg)


def vanilla(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
) -> PolicyTerms:
    """PPO clip per token with clip-higher (``clip_ratio_high`` > low, DAPO) and dual clip."""
    log_ratio = token_log_ratio(log_probs, old_log_probs)
    return clipped(log_ratio, advantages, clip_ratio_low, clip_ratio_high, clip_ratio_c)


def gspo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
) -> PolicyTerms:
    """GSPO: PPO clip on the sequence ratio; its band is narrow because a geometric mean moves little. GSPO's
    objective is this with ``loss_agg_mode="seq-mean-token-mean"`` (verl forces that mode; here it is the caller's)."""
    log_ratio = sequence_log_ratio(log_probs, old_log_probs, response_mask)
    return clipped(log_ratio, advantages, clip_ratio_low, clip_ratio_high, None)


PolicyLossFn = Callable[..., PolicyTerms]

POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "sapo": sapo,
    "sapo_seq": sapo_seq,
    "vanilla": vanilla,
    "gspo": gspo,
}


# ---- shared pieces --------------------------------------------------------------------------------------------


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs - ref_log_probs


def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_probs - ref_log_probs).square()


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's low-variance ``r - 1 - log r`` with ``r = pi_ref / pi``: non-negative, unbiased for KL(pi||ref)
    under samples from pi. Clamped as verl does, so a token the reference finds impossible cannot dominate."""
    log_r = torch.clamp(ref_log_probs - log_probs, -20, 20)
    return torch.clamp(torch.exp(log_r) - log_r - 1, -10, 10)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "kl": kl_k1,
    "k2": kl_k2,
    "mse": kl_k2,
    "k3": kl_k3,
    "low_var_kl": kl_k3,
}


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (verl's names are accepted)."""
    if kl_type not in KL_ESTIMATORS:
        raise InputError(f"kl_type: unknown {kl_type!r}; use one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kl_type](log_probs, ref_log_probs)


def truncated_is_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, tis_cap: float) -> torch.Tensor:
    """``min(pi_old / pi_rollout, tis_cap)``, detached: corrects for the inference engine sampling from a slightly
    different distribution than the trainer computes (kernels, precision), with the cap bounding the variance."""
    if not tis_cap > 0:
        raise InputError(f"tis_cap: {tis_cap} must be > 0 (truncated importance-sampling cap, usually 2.0)")
    log_w = torch.clamp(old_log_probs - rollout_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_w).clamp(max=tis_cap).detach()


# ---- the entry point ------------------------------------------------------------------------------------------


def policy_loss(
    loss_mode: str,
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    rollout_log_probs: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    rollout_is_weights: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_denominator: torch.Tensor | float | None = None,
    seq_len_norm: float | None = None,
    **params: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of ``loss_mode`` (a key of ``POLICY_LOSSES``) and its metrics.

    ``loss = agg(pg * tis * w) + kl_coef * agg(kl) - entropy_coef * agg(entropy)``, where ``pg`` is the mode's
    per-token surrogate, ``tis`` the truncated IS weight (1 without ``rollout_log_probs``), ``w`` the caller's
    ``rollout_is_weights`` (``rollout_correction``; 1 without them), ``kl`` the ``kl_type`` estimate
    against ``ref_log_probs`` and ``agg`` is ``aggregate_loss`` with ``loss_agg_mode``, ``loss_denominator`` and
    ``seq_len_norm`` (pass a global ``loss_denominator`` for global-batch normalisation; see ``aggregation``).
    ``params`` are the mode's own keywords (``tau_pos``, ``tau_neg``, ``clip_ratio_low``, ...).

    Metrics are detached 0-dim tensors on the loss's device (no host sync; stack and reduce them once per step):

    - ``pg_loss``, ``kl_loss`` (with ``ref_log_probs``), ``entropy`` (with ``entropy``): aggregated exactly like
      the loss, so they add up across micro-batches the same way the loss does.
    - ``ratio_mean``, ``grad_weight_mean``, ``grad_weight_low_frac`` (fraction of tokens whose gradient weight is
      below 0.5: the clip fraction for clipped modes, its soft counterpart for SAPO), ``approx_kl`` (k3 estimate of
      KL(pi_old || pi)), ``tis_weight_mean`` and ``tis_capped_frac`` (with ``rollout_log_probs``): means over this
      micro-batch's response tokens; average them across micro-batches weighted by ``num_tokens``.
    - ``ratio_max``: max over response tokens (0 when there are none); reduce with max.
    """
    if loss_mode not in POLICY_LOSSES:
        raise InputError(f"loss_mode: unknown {loss_mode!r}; use one of {', '.join(POLICY_LOSSES)}")
    mode_fn = POLICY_LOSSES[loss_mode]
    _check_params(loss_mode, mode_fn, params)
    check_loss_agg_mode(loss_agg_mode)
    _check_shapes(
        log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        response_mask=response_mask,
        rollout_log_probs=rollout_log_probs,
        rollout_is_weights=rollout_is_weights,
        ref_log_probs=ref_log_probs,
        entropy=entropy,
    )
    if kl_coef != 0 and ref_log_probs is None:
        raise InputError(f"kl_coef: {kl_coef} needs ref_log_probs; pass them or set kl_coef to 0")
    if entropy_coef != 0 and entropy is None:
        raise InputError(
            f"entropy_coef: {entropy_coef} needs entropy; pass the entropy that "
            "vocab_parallel_log_probs(..., return_entropy=True) returns, or set entropy_coef to 0"
        )

    mask = response_mask.bool()

    def agg(per_token: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(per_token, mask, loss_agg_mode, denominator=loss_denominator, seq_len_norm=seq_len_norm)

    terms = mode_fn(log_probs, old_log_probs, advantages, mask, **params)
    pg_per_token = terms.loss
    metrics: dict[str, torch.Tensor] = {}
    if rollout_log_probs is not None:
        tis = truncated_is_weights(old_log_probs, rollout_log_probs, tis_cap)
        pg_per_token = pg_per_token * tis
        metrics["tis_weight_mean"] = masked_mean(tis, mask)
        metrics["tis_capped_frac"] = masked_mean((tis >= tis_cap).to(tis.dtype), mask)
    if rollout_is_weights is not None:
        pg_per_token = pg_per_token * rollout_is_weights.detach()
    loss = pg = agg(pg_per_token)
    metrics["pg_loss"] = pg
    if ref_log_probs is not None:
        kl = agg(kl_penalty(log_probs, ref_log_probs, kl_type))
        loss = loss + kl_coef * kl
        metrics["kl_loss"] = kl
    if entropy is not None:
        mean_entropy = agg(entropy)
        loss = loss - entropy_coef * mean_entropy
        metrics["entropy"] = mean_entropy

    metrics["ratio_mean"] = masked_mean(terms.ratio, mask)
    metrics["ratio_max"] = torch.where(mask, terms.ratio, 0).amax()
    metrics["grad_weight_mean"] = masked_mean(terms.grad_weight, mask)
    metrics["grad_weight_low_frac"] = masked_mean((terms.grad_weight < 0.5).to(terms.ratio.dtype), mask)
    metrics["approx_kl"] = masked_mean(kl_k3(old_log_probs, log_probs), mask)
    metrics["num_tokens"] = mask.sum().to(terms.ratio.dtype)
    return loss, {name: value.detach() for name, value in metrics.items()}


def _check_params(loss_mode: str, mode_fn: PolicyLossFn, params: dict[str, float]) -> None:
    accepted = [p.name for p in inspect.signature(mode_fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InputError(
            f"{unknown[0]}: not a parameter of loss_mode {loss_mode!r}; it takes {', '.join(accepted) or 'none'}"
        )


def _check_shapes(log_probs: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if log_probs.dim() != 2:
        raise InputError(f"log_probs: expected [batch, response_len], got shape {tuple(log_probs.shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != log_probs.shape:
            raise InputError(f"{name}: shape {tuple(tensor.shape)} must equal log_probs' {tuple(log_probs.shape)}")
