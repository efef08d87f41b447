"""SAPO reinforcement learning for Mixture-of-Experts LLMs on Megatron-Core."""

import megatron_sapo.parallel  # noqa: F401  (first: its import hook must see megatron's first import)

__version__ = "0.1.0"
