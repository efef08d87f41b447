"""The ``data.*`` settings: which prompt files to read, how to read them, and the length budgets.

Names follow verl's ``data`` section (``max_prompt_length``, ``train_batch_size``, the DAPO overlong-buffer keys)
and slime's data keys (``prompt_key``/``label_key`` ~ ``--input-key``/``--label-key``, ``apply_chat_template``),
so configs carried over from either read the same here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_sapo.errors import InputError


@dataclass
class DataConfig:
    # Prompt sets: ``.jsonl`` or ``.parquet`` files, read in the order given.
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    # Row keys. A dotted label key (``reward_model.ground_truth``) reads a nested field; rows without the label key
    # fall back to verl's ``reward_model.ground_truth``. ``label_key=None``: rows carry no label (custom rewards).
    prompt_key: str = "prompt"
    label_key: str | None = "label"
    # verl's per-row dict handed to reward functions as ``extra_info`` (slime calls it ``metadata``).
    metadata_key: str = "extra_info"
    # Wrap string prompts as one user message and render every prompt with the tokenizer's chat template.
    apply_chat_template: bool = True
    # Prompts longer than this many tokens (after the chat template) are dropped at load, with a count logged.
    max_prompt_length: int = 1024
    max_response_length: int = 1024
    # Prompts per training step (groups of rollout.n responses each), and prompts drawn per generation round when
    # dynamic sampling has to top a step up (None: train_batch_size).
    train_batch_size: int = 8
    gen_batch_size: int | None = None
    shuffle: bool = True
    seed: int = 1
    # Skip malformed rows (counted and logged) instead of stopping at the first one.
    skip_bad_rows: bool = False
    # DAPO's soft overlong punishment, applied by the loss package: responses within the last
    # ``overlong_buffer_len`` tokens of ``max_response_length`` lose up to ``overlong_penalty_factor`` reward.
    enable_overlong_buffer: bool = False
    overlong_buffer_len: int = 256
    overlong_penalty_factor: float = 1.0

    def __post_init__(self):
        # A single path from a command line override is as good as a list of one.
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.val_files, str):
            self.val_files = [self.val_files]
        for name in ("max_prompt_length", "max_response_length", "train_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"data.{name}={value!r}: must be a positive integer")
        if self.gen_batch_size is not None and (not isinstance(self.gen_batch_size, int) or self.gen_batch_size < 1):
            raise InputError(
                f"data.gen_batch_size={self.gen_batch_size!r}: must be a positive integer, or null for train_batch_size"
            )
        if not self.prompt_key:
            raise InputError("data.prompt_key is empty: name the row key that holds the prompt (default 'prompt')")
        if self.enable_overlong_buffer:
            if not 0 < self.overlong_buffer_len <= self.max_response_length:
                raise InputError(
                    f"data.overlong_buffer_len={self.overlong_buffer_len}: must be in (0, data.max_response_length="
                    f"{self.max_response_length}]"
                )
            if not self.overlong_penalty_factor >= 0:
                raise InputError(f"data.overlong_penalty_factor={self.overlong_penalty_factor}: must be >= 0")

    @property
    def prompts_per_generation_round(self) -> int:
        return self.gen_batch_size or self.train_batch_size
