"""The rule-based rewards on concrete responses, with expected values worked out by hand."""

import pytest

from megatron_sapo.rewards import exact_match
from megatron_sapo.rewards import math as math_reward
from megatron_sapo.rewards.math import extract_final_answer


@pytest.mark.parametrize(
    "response, answer",
    [
        ("Answer: 7", "7"),
        ("3+4 is 7, and 7*2 = 14.", "14"),  # the last number; the sentence's full stop is not a decimal point
        ("I get 4, so the answer is \\boxed{3}. Checking: 3+0=3, 99 ways", "3"),  # a box beats later numbers
        ("\\boxed{1} first, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # nested braces
        ("so \\boxed 12$ done", "12"),
        ("\\boxed{5 unclosed", "5"),  # an unbalanced box falls back to the last number
        ("7-2=5", "5"),
        ("x = -4.", "-4"),  # a minus after a space is a sign ...
        ("10-4", "4"),  # ... and after a digit a subtraction
        ("Total: 1,000 apples", "1000"),
        ("pairs 3,4", "4"),  # not a thousands separator
        ("about 2.50 or 3/4", "3/4"),
        ("no digits here", None),
    ],
)
def test_final_answer_extraction(response, answer):
    assert extract_final_answer(response) == answer


@pytest.mark.parametrize(
    "response, label, reward",
    [
        ("Answer: 7", "7", 1.0),
        ("Answer: 17", "7", 0.0),
        ("Answer: 7.0", "7", 1.0),
        ("Answer: 7.5", "7", 0.0),
        ("Answer: 19", 19, 1.0),  # an int label, as JSON gives it
        ("Answer: 19", "\\boxed{19}", 1.0),  # a boxed label counts by its box
        ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
        ("So it is 1/2", "\\frac{1}{2}", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{x+1}", "1+x", 1.0),
        ("\\boxed{3}, or maybe 4", "4", 0.0),
        ("Total: 1,000", "1000", 1.0),
        ("Answer: -3", "-3", 1.0),
        ("Answer: 3", "-3", 0.0),
        ("No idea.", "7", 0.0),
        ("", "7", 0.0),
    ],
)
def test_math_reward(response, label, reward):
    assert math_reward.compute_score("", response, label) == reward


@pytest.mark.parametrize(
    "response, label, reward",
    [(" 7 \n", "7", 1.0), ("7", 7, 1.0), ("Answer: 7", "7", 0.0), ("7.0", "7", 0.0), ("Paris", "paris", 0.0)],
)
def test_exact_match_reward(response, label, reward):
    assert exact_match.compute_score("", response, label) == reward
