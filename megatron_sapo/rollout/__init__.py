"""Rollouts: one client for SGLang's HTTP API, an embedded CPU server speaking it, the SGLang launcher, and
weight sync from the trainer (see engine.py for the entry point)."""

from megatron_sapo.rollout.client import RolloutClient, RolloutError, RolloutSample, SamplingParams
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.rollout.engine import RolloutEngine
from megatron_sapo.rollout.weight_sync import WeightSyncStats

__all__ = [
    "RolloutClient",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutError",
    "RolloutSample",
    "SamplingParams",
    "WeightSyncStats",
]
