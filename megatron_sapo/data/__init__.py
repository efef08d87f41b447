"""Prompt data: tokenizers, prompt sets (JSONL/Parquet, slime's and verl's layouts) and the demo's toy task."""

from megatron_sapo.data.config import DataConfig
from megatron_sapo.data.prompts import LoadStats, PromptItem, PromptSet, PromptStream, load_prompts
from megatron_sapo.data.tokenizer import load_tokenizer

__all__ = ["DataConfig", "LoadStats", "PromptItem", "PromptSet", "PromptStream", "load_prompts", "load_tokenizer"]
