"""Advantage estimators for sequence-level (outcome) rewards, and DAPO's overlong reward shaping.

``rewards[batch]`` holds one score per response; ``group_index[batch]`` says which prompt each response answers
(the responses sampled for one prompt form a group). Advantages come back as ``[batch, response_len]``, zero off the
response mask.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from megatron_sapo.errors import InputError

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "gae")

# Added to a group's std so that a group whose responses all scored the same gets advantage 0, not 0 / 0.
GRPO_STD_EPS = 1e-6
# Added to the variance when whitening over the batch's tokens (verl's masked_whiten).
WHITEN_VAR_EPS = 1e-8


def compute_advantages(
    estimator: str,
    *,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: torch.Tensor | Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """Per-token advantages ``[batch, response_len]`` for ``estimator``, one of ``ADVANTAGE_ESTIMATORS``:

    - ``grpo``: ``(score - group mean) / (group std + 1e-6)`` (unbiased std); with ``norm_by_std=False`` only the
      mean is subtracted (Dr. GRPO).
    - ``rloo``: ``score - mean of the other scores in the group`` = ``n / (n - 1) * (score - group mean)``.
    - ``reinforce_plus_plus``: the score discounted by ``gamma`` per later response token, whitened over all
      response tokens of the batch (no groups).
    - ``gae``: GAE(``gamma``, ``lam``) with per-token ``values`` and the score as the reward of the last response
      token, skipping non-response tokens, whitened over the batch's response tokens (as verl does).

    For ``grpo`` and ``rloo`` a response alone in its group has no baseline and keeps its raw score.
    ``group_index`` may be an integer tensor or any sequence of hashable ids (e.g. uid strings); it is only read by
    ``grpo`` and ``rloo``. ``norm_by_std`` only applies to ``grpo``.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise InputError(f"estimator: unknown {estimator!r}; use one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    if response_mask.dim() != 2:
        raise InputError(f"response_mask: expected [batch, response_len], got shape {tuple(response_mask.shape)}")
    batch = response_mask.shape[0]
    if rewards.shape != (batch,):
        raise InputError(f"rewards: shape {tuple(rewards.shape)} must be [batch] = ({batch},), one score per response")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0 <= value <= 1:
            raise InputError(f"{name}: {value} must be in [0, 1]")
    mask = response_mask.bool()
    scores = rewards.to(torch.promote_types(rewards.dtype, torch.float32))

    if estimator in ("grpo", "rloo"):
        ids = _group_ids(group_index, batch, scores.device)
        if estimator == "grpo":
            per_sequence = grpo_advantages(scores, ids, norm_by_std=norm_by_std)
        else:
            per_sequence = rloo_advantages(scores, ids)
        return torch.where(mask, per_sequence[:, None], 0)
    if estimator == "reinforce_plus_plus":
        return reinforce_plus_plus_advantages(scores, mask, gamma=gamma)
    if values is None:
        raise InputError("values: estimator 'gae' needs per-token values [batch, response_len] from the critic")
    if values.shape != mask.shape:
        raise InputError(f"values: shape {tuple(values.shape)} must equal response_mask's {tuple(mask.shape)}")
    return gae_advantages(scores, values.to(scores.dtype), mask, gamma=gamma, lam=lam)[0]


def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, *, norm_by_std: bool = True) -> torch.Tensor:
    """Per-response GRPO advantage; ``group_ids`` are ``0..num_groups-1``."""
    counts, mean = _group_counts_and_means(scores, group_ids)
    centered = scores - mean[group_ids]
    squares = torch.zeros_like(mean).index_add_(0, group_ids, centered.square())
    std = (squares / (counts - 1).clamp(min=1)).sqrt()
    advantages = centered / (std[group_ids] + GRPO_STD_EPS) if norm_by_std else centered
    return torch.where(counts[group_ids] > 1, advantages, scores)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-response leave-one-out advantage; ``group_ids`` are ``0..num_groups-1``."""
    counts, mean = _group_counts_and_means(scores, group_ids)
    n = counts[group_ids]
    return torch.where(n > 1, n / (n - 1).clamp(min=1) * (scores - mean[group_ids]), scores)


def reinforce_plus_plus_advantages(scores: torch.Tensor, response_mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """REINFORCE++: discounted return of the final score at each response token, whitened over the batch."""
    maskf = response_mask.to(scores.dtype)
    tokens_after = maskf.flip(-1).cumsum(-1).flip(-1) - maskf
    returns = scores[:, None] * torch.pow(torch.as_tensor(gamma, dtype=scores.dtype), tokens_after)
    return _masked_whiten(returns, response_mask)


def gae_advantages(
    scores: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(``gamma``, ``lam``) advantages (whitened) and returns (the critic's targets), verl's way.

    The score is the reward of the last response token, every other token's reward is 0; the value after the last
    token is 0 (the episode ends). A non-response token (e.g. a tool observation) is skipped: it passes the next
    response token's value and advantage through, so the recursion links consecutive response tokens. Returns are
    the raw advantages plus the values; the advantages are then whitened over the batch's response tokens. Both
    are 0 off the mask."""
    mask = response_mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    token_rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    has_tokens = last >= 0
    token_rewards[has_tokens, last[has_tokens]] = scores[has_tokens]

    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(scores)
    next_advantage = torch.zeros_like(scores)
    for t in reversed(range(mask.shape[-1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        on = mask[:, t]
        next_value = torch.where(on, values[:, t], next_value)
        next_advantage = torch.where(on, delta + gamma * lam * next_advantage, next_advantage)
        advantages[:, t] = next_advantage
    returns = torch.where(mask, advantages + values, 0)
    return _masked_whiten(advantages, mask), returns


def apply_overlong_penalty(
    rewards: torch.Tensor,
    response_lengths: torch.Tensor,
    *,
    max_response_length: int,
    overlong_buffer_len: int,
    overlong_penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment: scores shaped by ``-min((l - (L - B)) / B, 1) * factor`` for l > L - B.

    Responses inside the last ``B = overlong_buffer_len`` tokens of the budget ``L = max_response_length`` lose
    reward linearly in how far in they are, reaching ``overlong_penalty_factor`` at L, so the policy learns to stop
    before truncation without the noise of scoring truncated answers as plain failures.
    """
    if not 0 < overlong_buffer_len <= max_response_length:
        raise InputError(
            f"overlong_buffer_len: {overlong_buffer_len} must be in (0, max_response_length = {max_response_length}]"
        )
    if not overlong_penalty_factor >= 0:
        raise InputError(f"overlong_penalty_factor: {overlong_penalty_factor} must be >= 0")
    if response_lengths.shape != rewards.shape:
        raise InputError(
            f"response_lengths: shape {tuple(response_lengths.shape)} must equal rewards' {tuple(rewards.shape)}"
        )
    excess = (response_lengths.to(rewards.dtype) - (max_response_length - overlong_buffer_len)) / overlong_buffer_len
    return rewards - excess.clamp(0, 1) * overlong_penalty_factor


def _group_ids(group_index: torch.Tensor | Sequence[Hashable] | None, batch: int, device: torch.device) -> torch.Tensor:
    """Dense ids ``0..num_groups-1`` for ``group_index``."""
    if group_index is None:
        raise InputError("group_index: grpo and rloo need the prompt id of each response, shape [batch]")
    if isinstance(group_index, torch.Tensor):
        ids = torch.unique(group_index.reshape(-1), return_inverse=True)[1]
    else:
        dense: dict[Hashable, int] = {}
        ids = torch.tensor([dense.setdefault(key, len(dense)) for key in group_index], dtype=torch.long)
    if ids.shape != (batch,):
        raise InputError(f"group_index: {ids.numel()} ids for {batch} responses; give one prompt id per response")
    return ids.to(device)


def _group_counts_and_means(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    counts = torch.bincount(group_ids, minlength=num_groups).to(scores.dtype)
    sums = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(0, group_ids, scores)
    return counts, sums / counts.clamp(min=1)


def _masked_whiten(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and unbiased variance over response tokens; 0 off the mask."""
    count = int(response_mask.sum())
    if count < 2:
        raise InputError(f"response_mask: {count} response token(s) in the batch; whitening needs at least 2")
    mean = values[response_mask].mean()
    var = values[response_mask].var()
    return torch.where(response_mask, (values - mean) * torch.rsqrt(var + WHITEN_VAR_EPS), 0)
