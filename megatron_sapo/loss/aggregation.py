"""Reduce a per-token loss ``[batch, response_len]`` to a scalar, with the normaliser a trainer can make global.

Every mode is ``numerator / denominator``, the numerator summed over this micro-batch:

- ``token-mean``: sum of the loss over response tokens / number of response tokens.
- ``seq-mean-token-sum``: sum over sequences of each sequence's token sum / number of non-empty sequences.
- ``seq-mean-token-mean``: sum over sequences of each sequence's token mean / number of non-empty sequences.
- ``seq-mean-token-sum-norm``: sum over sequences of (token sum / ``seq_len_norm``) / number of non-empty sequences.

``seq_len_norm`` is a constant (Dr. GRPO's fixed length; default: ``response_len``). verl's micro-batch value for
that mode is the total divided by ``seq_len_norm`` alone; here it is also averaged over sequences, so that every
mode is a mean and they all share the global-denominator scheme below. Rows whose mask is empty add
nothing to either side, and an empty denominator counts as 1, so nothing is ever NaN.

Global-batch normalisation: by default the denominator is this micro-batch's own count, so the result is the
micro-batch mean. A trainer that wants the exact mean over a global batch sums ``loss_denominator(mask, mode)`` over
its micro-batches and all-reduces it over data-parallel ranks, then passes that total as ``denominator`` to every
micro-batch: the micro-batch losses then *sum* (over micro-batches and DP ranks) to the global-batch value. Megatron's
DDP averages gradients over DP ranks, so scale each micro-batch loss by ``dp_size`` to undo that average.
"""

from __future__ import annotations

import torch

from megatron_sapo.errors import InputError

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_loss_agg_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise InputError(f"loss_agg_mode: unknown {loss_agg_mode!r}; use one of {', '.join(LOSS_AGG_MODES)}")


def loss_denominator(response_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """This micro-batch's count that ``loss_agg_mode`` divides by: response tokens, or non-empty sequences."""
    check_loss_agg_mode(loss_agg_mode)
    mask = response_mask.bool()
    if loss_agg_mode == "token-mean":
        return mask.sum().float()
    return mask.any(dim=-1).sum().float()


def aggregate_loss(
    per_token: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    denominator: torch.Tensor | float | None = None,
    seq_len_norm: float | None = None,
) -> torch.Tensor:
    """Scalar loss from ``per_token`` ``[batch, response_len]`` as the table in this module's docstring says."""
    check_loss_agg_mode(loss_agg_mode)
    if seq_len_norm is not None and not seq_len_norm > 0:
        raise InputError(f"seq_len_norm: {seq_len_norm} must be > 0, e.g. the max response length")
    mask = response_mask.bool()
    # where, not multiply: padding positions may hold inf/NaN (e.g. garbage log-probs) that 0 * x would spread.
    token_sums = torch.where(mask, per_token, 0).sum(dim=-1)
    if loss_agg_mode in ("token-mean", "seq-mean-token-sum"):
        numerator = token_sums.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        numerator = (token_sums / mask.sum(dim=-1).clamp(min=1)).sum()
    else:
        numerator = token_sums.sum() / (per_token.shape[-1] if seq_len_norm is None else seq_len_norm)
    if denominator is None:
        denominator = loss_denominator(mask, loss_agg_mode)
    return numerator / torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device).clamp(min=1)


def masked_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over response tokens; 0 when there are none."""
    mask = response_mask.bool()
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)
