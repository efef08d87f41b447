"""Model providers: an HF ``config.json`` → one architecture description (:class:`ModelArch`, filled by the family's
provider module) → Megatron-Core ``GPTModel`` chunks (:mod:`megatron_sapo.models.gpt`, family-agnostic)."""

from megatron_sapo.models.arch import ModelArch
from megatron_sapo.models.gpt import ModelOptions, build_model, transformer_engine_usable
from megatron_sapo.models.providers import arch_from_config, load_arch

__all__ = ["ModelArch", "ModelOptions", "arch_from_config", "build_model", "load_arch", "transformer_engine_usable"]
