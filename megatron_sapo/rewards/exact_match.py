"""Exact-match reward: 1 when the response, stripped of surrounding whitespace, equals the label, else 0.

Responses are scored as decoded without special tokens (no trailing ``<|im_end|>``); nothing else is normalised,
so use the ``math`` reward when answers come wrapped in text such as ``Answer: 7``.
"""

from __future__ import annotations

from typing import Any


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """The ``exact_match`` reward, in the reward-function convention of :mod:`megatron_sapo.rewards.registry`."""
    return 1.0 if solution_str.strip() == str(ground_truth).strip() else 0.0
