"""Which provider reads a config.json: by ``model_type``, else by ``architectures``; anything else is refused by name.

A family is one provider module (``MODEL_TYPE``, ``HF_ARCHITECTURE``, ``arch_from_config``) listed here, plus its
rows in the mapping table (:mod:`megatron_sapo.convert.mapping`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_sapo.errors import InputError
from megatron_sapo.models import qwen2, qwen3, qwen3_moe
from megatron_sapo.models.arch import ModelArch

PROVIDERS = (qwen2, qwen3, qwen3_moe)


def supported() -> str:
    return ", ".join(f"{p.MODEL_TYPE} ({p.HF_ARCHITECTURE})" for p in PROVIDERS)


def arch_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArch:
    """The architecture of an HF config dict; an unsupported family is one InputError line naming it."""
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    provider = next((p for p in PROVIDERS if p.MODEL_TYPE == model_type), None)
    if provider is None:
        provider = next((p for p in PROVIDERS if p.HF_ARCHITECTURE in architectures), None)
    if provider is None:
        raise InputError(
            f"{source}: model_type={model_type!r} (architectures={architectures}) is not supported; "
            f"megatron_sapo supports {supported()}"
        )
    return provider.arch_from_config(config, source=source)


def load_arch(hf_dir: str) -> ModelArch:
    """The architecture of the HF checkpoint (or bare config folder) ``hf_dir``, from its config.json."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise InputError(
            f"--hf-dir: no config.json in {hf_dir}; point it at a Hugging Face checkpoint folder"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e}); re-download or re-export the checkpoint") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object; re-download or re-export the checkpoint")
    return arch_from_config(config, source=path)
