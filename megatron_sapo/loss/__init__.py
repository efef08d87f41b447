"""The RL loss: log-probs on vocab-parallel logits, policy losses (SAPO and the PPO family), advantages, the
critic's value loss."""

from megatron_sapo.loss.advantages import (
    ADVANTAGE_ESTIMATORS,
    apply_overlong_penalty,
    compute_advantages,
    gae_advantages,
)
from megatron_sapo.loss.aggregation import LOSS_AGG_MODES, aggregate_loss, loss_denominator, masked_mean
from megatron_sapo.loss.logprobs import vocab_parallel_log_probs
from megatron_sapo.loss.policy import KL_ESTIMATORS, POLICY_LOSSES, PolicyTerms, kl_penalty, policy_loss
from megatron_sapo.loss.rollout_correction import Correction, check_rollout_correction, rollout_correction
from megatron_sapo.loss.value import explained_variance, value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "Correction",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "PolicyTerms",
    "aggregate_loss",
    "apply_overlong_penalty",
    "check_rollout_correction",
    "compute_advantages",
    "explained_variance",
    "gae_advantages",
    "kl_penalty",
    "loss_denominator",
    "masked_mean",
    "policy_loss",
    "rollout_correction",
    "value_loss",
    "vocab_parallel_log_probs",
]
