"""DAPO's dynamic sampling: train only on groups whose rewards differ, generating more until the batch is full.

A group (the ``rollout.n`` responses to one prompt) whose rewards all agree, all solved or all failed, has zero
group-normalised advantage: it adds no gradient, only shrinks the share of the batch that does. DAPO drops such
groups and keeps generating until ``data.train_batch_size`` informative groups are collected, then trains on
exactly that many (surplus groups from the last round are discarded).

The number of generation rounds per step is bounded by ``dynamic_sampling.max_num_gen_batches``; when they run
out, :func:`fill_batch` raises :class:`DynamicSamplingExhausted`, as verl's DAPO recipe does. Proceeding with a
short batch instead would quietly change the batch size the run was tuned for, and running out almost always
means something is wrong that should stop the run: a reward function that scores everything 0 (check
``num_errors``/``num_timeouts`` and the answer format), or data the model already solves or never can. Set it to 0
to generate without bound.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

from megatron_sapo.errors import InputError

Group = TypeVar("Group")


class DynamicSamplingExhausted(RuntimeError):
    """``max_num_gen_batches`` generation rounds did not yield ``train_batch_size`` informative groups."""


def group_is_informative(scores: Sequence[float]) -> bool:
    """True when the group's rewards are not all equal (their standard deviation is not zero)."""
    return len(scores) > 0 and max(scores) != min(scores)


def informative_sample_mask(group_ids: Sequence[Hashable], scores: Sequence[float]) -> list[bool]:
    """Per response: whether it belongs to a group whose rewards are not all equal.

    ``group_ids[i]`` names the group of response ``i`` (its prompt draw); groups need not be contiguous.
    """
    if len(group_ids) != len(scores):
        raise ValueError(f"{len(group_ids)} group ids for {len(scores)} scores; give one group id per response")
    low: dict[Hashable, float] = {}
    high: dict[Hashable, float] = {}
    for group, score in zip(group_ids, scores, strict=True):
        low[group] = min(low.get(group, score), score)
        high[group] = max(high.get(group, score), score)
    return [low[group] != high[group] for group in group_ids]


def fill_batch(
    generate_round: Callable[[], Sequence[Group]],
    scores_of: Callable[[Group], Sequence[float]],
    num_groups: int,
    max_num_gen_batches: int,
) -> tuple[list[Group], dict[str, int]]:
    """Call ``generate_round`` until ``num_groups`` informative groups are collected; return exactly that many.

    ``generate_round()`` draws the next prompts, generates and scores their groups, and returns them;
    ``scores_of(group)`` gives a group's rewards. Groups keep their generation order. The returned metrics count
    rounds and groups. Raises :class:`DynamicSamplingExhausted` after ``max_num_gen_batches`` rounds (0: never).
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    kept: list[Group] = []
    metrics = {"num_gen_batches": 0, "num_groups_generated": 0, "num_groups_informative": 0}
    while len(kept) < num_groups:
        if 0 < max_num_gen_batches <= metrics["num_gen_batches"]:
            raise DynamicSamplingExhausted(
                f"dynamic sampling: {metrics['num_gen_batches']} generation rounds gave "
                f"{metrics['num_groups_informative']} of the {num_groups} groups needed with rewards that differ "
                f"(of {metrics['num_groups_generated']} generated); check the rewards (errors, answer format) and "
                "the data's difficulty, or raise dynamic_sampling.max_num_gen_batches (0: no limit)"
            )
        groups = generate_round()
        metrics["num_gen_batches"] += 1
        metrics["num_groups_generated"] += len(groups)
        for group in groups:
            scores = scores_of(group)
            if len(scores) < 2:
                raise InputError(
                    "dynamic_sampling.enable=true needs at least 2 responses per prompt (rollout.n >= 2); a group of "
                    f"{len(scores)} never has rewards that differ"
                )
            if group_is_informative(scores):
                kept.append(group)
                metrics["num_groups_informative"] += 1
    metrics["num_groups_discarded"] = len(kept) - num_groups
    return kept[:num_groups], metrics
