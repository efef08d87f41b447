"""Rewards: rule-based math and exact-match rewards, user reward functions, and DAPO dynamic sampling.

Importing this package is cheap: a reward function's module (math-verify and sympy for ``math``) is imported
when a :class:`RewardManager` is made for it.
"""

from megatron_sapo.rewards.config import REWARD_TYPES, DynamicSamplingConfig, RewardConfig
from megatron_sapo.rewards.dynamic_sampling import (
    DynamicSamplingExhausted,
    fill_batch,
    group_is_informative,
    informative_sample_mask,
)
from megatron_sapo.rewards.registry import BUILTIN_REWARD_FUNCTIONS, RewardSample, load_reward_function, score_of
from megatron_sapo.rewards.workers import RewardManager, compute_rewards

__all__ = [
    "BUILTIN_REWARD_FUNCTIONS",
    "REWARD_TYPES",
    "DynamicSamplingConfig",
    "DynamicSamplingExhausted",
    "RewardConfig",
    "RewardManager",
    "RewardSample",
    "compute_rewards",
    "fill_batch",
    "group_is_informative",
    "informative_sample_mask",
    "load_reward_function",
    "score_of",
]
