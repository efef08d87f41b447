"""The ``reward.*`` and ``dynamic_sampling.*`` settings."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sapo.errors import InputError

REWARD_TYPES = ("math", "exact_match", "custom")


@dataclass
class RewardConfig:
    # math: final answer (last \boxed{} or last number) equals the label; exact_match: stripped response equals
    # the label; custom: ``custom_function``.
    type: str = "math"
    # "package.module:function" or "path/to/file.py:function", called like verl's compute_score:
    # fn(data_source=, solution_str=, ground_truth=, extra_info=) -> float, or a dict with a "score".
    custom_function: str | None = None
    # Seconds one response may take to score; past it the response scores 0 and its worker is replaced.
    timeout_s: float = 10.0
    # Worker processes that score in parallel (started once, reused every step). 0 scores in the trainer process:
    # for debugging only, as nothing can interrupt a hung reward function there and timeout_s is not enforced.
    num_workers: int = 4

    def __post_init__(self):
        if self.type not in REWARD_TYPES:
            raise InputError(f"reward.type={self.type!r}: use one of {', '.join(REWARD_TYPES)}")
        if self.type == "custom" and not self.custom_function:
            raise InputError(
                "reward.type=custom needs reward.custom_function: 'package.module:function' or 'path/file.py:function'"
            )
        if self.type != "custom" and self.custom_function:
            raise InputError(
                f"reward.custom_function is set but reward.type={self.type!r}; set reward.type=custom to use it"
            )
        if not self.timeout_s > 0:
            raise InputError(f"reward.timeout_s={self.timeout_s}: must be > 0 seconds")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise InputError(f"reward.num_workers={self.num_workers!r}: must be >= 0 (0 scores in-process)")


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (verl's ``algorithm.filter_groups``): train only on groups whose rewards differ."""

    enable: bool = False
    # Generation rounds allowed per training step before giving up with an error; 0 allows any number (verl).
    max_num_gen_batches: int = 10

    def __post_init__(self):
        if not isinstance(self.max_num_gen_batches, int) or self.max_num_gen_batches < 0:
            raise InputError(
                f"dynamic_sampling.max_num_gen_batches={self.max_num_gen_batches!r}: must be >= 0 (0: unlimited)"
            )
