"""DAPO dynamic sampling: which groups are kept, how rounds fill a batch, and when it gives up."""

import pytest

from megatron_sapo.errors import InputError
from megatron_sapo.rewards import (
    DynamicSamplingConfig,
    DynamicSamplingExhausted,
    fill_batch,
    group_is_informative,
    informative_sample_mask,
)


def test_sample_mask_keeps_groups_whose_rewards_differ():
    group_ids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.25]
    assert informative_sample_mask(group_ids, scores) == [True, True, False, False, False, False, True, True]
    # Groups need not be contiguous: group 0 is {1, 0}, group 1 is {1, 1}.
    assert informative_sample_mask([0, 1, 0, 1], [1.0, 1.0, 0.0, 1.0]) == [True, False, True, False]
    with pytest.raises(ValueError, match="3 group ids for 2 scores"):
        informative_sample_mask([0, 0, 1], [1.0, 0.0])


def test_group_is_informative():
    assert group_is_informative([0.0, 1.0, 1.0])
    assert not group_is_informative([0.7, 0.7, 0.7])
    assert not group_is_informative([])


class Rounds:
    """A generate_round that hands out prepared rounds of ``(name, scores)`` groups and counts the calls."""

    def __init__(self, rounds):
        self.rounds, self.calls = list(rounds), 0

    def __call__(self):
        self.calls += 1
        return self.rounds.pop(0)


def scores_of(group):
    return group[1]


ROUNDS = [
    [("p0", [1, 1]), ("p1", [0, 1]), ("p2", [0, 0])],
    [("p3", [1, 0]), ("p4", [1, 1]), ("p5", [0.5, 0.2])],
    [("p6", [1, 0])],
]


def test_fill_batch_generates_until_full_and_keeps_order():
    rounds = Rounds(ROUNDS)
    groups, metrics = fill_batch(rounds, scores_of, num_groups=3, max_num_gen_batches=5)
    assert [name for name, _ in groups] == ["p1", "p3", "p5"]
    assert rounds.calls == 2
    assert metrics == {
        "num_gen_batches": 2,
        "num_groups_generated": 6,
        "num_groups_informative": 3,
        "num_groups_discarded": 0,
    }


def test_fill_batch_drops_the_surplus_of_the_last_round():
    groups, metrics = fill_batch(Rounds(ROUNDS), scores_of, num_groups=2, max_num_gen_batches=5)
    assert [name for name, _ in groups] == ["p1", "p3"]
    assert (metrics["num_groups_informative"], metrics["num_groups_discarded"]) == (3, 1)


def test_fill_batch_gives_up_after_max_num_gen_batches():
    rounds = Rounds([[("solved", [1, 1, 1]), ("failed", [0, 0, 0])]] * 10)
    with pytest.raises(
        DynamicSamplingExhausted, match=r"3 generation rounds gave 0 of the 1 groups needed .*of 6 generated"
    ):
        fill_batch(rounds, scores_of, num_groups=1, max_num_gen_batches=3)
    assert rounds.calls == 3

    # 0: no limit, as in verl.
    unbounded = Rounds([[("solved", [1, 1])]] * 6 + [[("mixed", [1, 0])]])
    groups, metrics = fill_batch(unbounded, scores_of, num_groups=1, max_num_gen_batches=0)
    assert [name for name, _ in groups] == ["mixed"]
    assert unbounded.calls == metrics["num_gen_batches"] == 7


def test_single_response_groups_are_refused():
    with pytest.raises(InputError, match=r"needs at least 2 responses per prompt \(rollout.n >= 2\)"):
        fill_batch(Rounds([[("only", [1.0])]]), scores_of, num_groups=1, max_num_gen_batches=2)


def test_config_validation():
    assert DynamicSamplingConfig().max_num_gen_batches == 10
    with pytest.raises(InputError, match=r"^dynamic_sampling.max_num_gen_batches=-1: must be >= 0"):
        DynamicSamplingConfig(max_num_gen_batches=-1)
