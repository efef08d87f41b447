"""The critic's loss: verl's clipped value loss, and the explained variance of its values.

``vf_loss = 0.5 * agg(max((v - R)², (clip(v, v_old - c, v_old + c) - R)²))`` over response tokens, ``v`` the
critic's current values, ``v_old`` its values when the batch was made (those GAE used), ``R`` the GAE returns and
``c`` = ``critic.cliprange_value``; ``agg`` is ``loss_agg_mode``'s aggregation (``aggregation.py``), with the
global-batch denominator a trainer passes in. ``vf_clipfrac`` is the fraction of response tokens where the clipped
term is the larger.
"""

from __future__ import annotations

import torch

from megatron_sapo.errors import InputError
from megatron_sapo.loss.aggregation import aggregate_loss, masked_mean

# verl's explained variance adds this to the variance of the returns (metric_utils.compute_data_metrics).
EXPLAINED_VARIANCE_EPS = 1e-5


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    loss_denominator: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(vf_loss, metrics)`` for ``values`` ``[batch, response_len]``; metrics: ``vf_loss``, ``vf_clipfrac`` and
    ``vpred_mean`` (token means over this micro-batch, detached) and ``num_tokens``."""
    if not cliprange_value > 0:
        raise InputError(f"cliprange_value: {cliprange_value} must be > 0")
    mask = response_mask.bool()
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped - returns).square()
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped_loss, clipped_loss), mask, loss_agg_mode,
                                denominator=loss_denominator)  # fmt: skip
    metrics = {
        "vf_loss": loss.detach(),
        "vf_clipfrac": masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask),
        "vpred_mean": masked_mean(values.detach(), mask),
        "num_tokens": mask.sum(),
    }
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> float:
    """``1 - Var(R - v) / (Var(R) + 1e-5)`` over the response tokens (unbiased variances, as verl's metric)."""
    mask = response_mask.bool()
    if int(mask.sum()) < 2:
        return 0.0
    returns, values = returns[mask].double(), values[mask].double()
    return float(1.0 - (returns - values).var() / (returns.var() + EXPLAINED_VARIANCE_EPS))
