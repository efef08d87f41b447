"""Prompt sets: read JSONL/Parquet rows, render and tokenize the prompts, and serve them in a resumable order.

A row holds a prompt (a string, or a list of ``{role, content}`` chat messages) and a label. Two layouts are read
without conversion:

* slime's: ``{"prompt": "What is 3+4?", "label": "7"}`` (keys set by ``data.prompt_key``/``data.label_key``);
* verl's: ``{"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": "7"},
  "data_source": "gsm8k", "extra_info": {...}}``; a row without the label key falls back to
  ``reward_model.ground_truth``.

Everything is read and tokenized at load, so prompts over ``data.max_prompt_length`` are dropped (and counted)
before training starts and a malformed row stops the run at once, naming its file and line.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

from megatron_sapo.data.config import DataConfig
from megatron_sapo.errors import InputError

logger = logging.getLogger(__name__)

VERL_LABEL_PATH = "reward_model.ground_truth"
SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class PromptItem:
    """One prompt, ready for generation, with what the reward function needs to score its responses."""

    index: int  # position in the loaded prompt set; the same row gets the same index in every run of a config
    prompt_ids: list[int]
    label: Any  # None when data.label_key is null
    raw_prompt: str | list[dict]  # as written in the file, for servers that apply the chat template themselves
    prompt_text: str  # what was tokenized: raw_prompt rendered with the chat template (or as is)
    data_source: str = ""
    extra_info: dict = field(default_factory=dict)
    source: str = ""  # "train.jsonl:17", for messages and logs


@dataclass
class LoadStats:
    num_rows: int = 0
    num_bad_rows: int = 0
    num_too_long: int = 0

    @property
    def num_prompts(self) -> int:
        return self.num_rows - self.num_bad_rows - self.num_too_long


@dataclass
class PromptSet:
    items: list[PromptItem]
    stats: LoadStats


class BadRow(Exception):
    """A row that cannot be used; the message says what is wrong and how to fix it."""


def load_prompts(config: DataConfig, tokenizer, split: Literal["train", "val"] = "train") -> PromptSet:
    """Read, check, render and tokenize every row of ``data.{split}_files``; drop rows over the prompt budget."""
    files_field = f"data.{split}_files"
    paths = list(getattr(config, f"{split}_files"))
    if not paths:
        raise InputError(f"{files_field} is empty: give one or more .jsonl or .parquet prompt files")
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{files_field}: no such file {path}")
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise InputError(f"{files_field}: {path} is neither .jsonl nor .parquet; convert it to one of them")
    if config.apply_chat_template and getattr(tokenizer, "chat_template", "") is None:
        raise InputError(
            "data.apply_chat_template=true but the tokenizer has no chat template; set it to false or use a "
            "tokenizer_config.json with a chat_template"
        )

    items: list[PromptItem] = []
    stats = LoadStats()
    first_bad = None
    for path in paths:
        rows_before = stats.num_rows
        for location, row in read_rows(path):
            stats.num_rows += 1
            try:
                item = make_prompt_item(row, location, len(items), tokenizer, config)
            except BadRow as bad:
                if not config.skip_bad_rows:
                    raise InputError(f"{location}: {bad}") from None
                stats.num_bad_rows += 1
                first_bad = first_bad or f"{location}: {bad}"
                continue
            if len(item.prompt_ids) > config.max_prompt_length:
                stats.num_too_long += 1
                continue
            items.append(item)
        if stats.num_rows == rows_before:
            raise InputError(f"{files_field}: {path} is empty (no rows); give it prompts or leave it out")

    if stats.num_bad_rows:
        logger.warning(
            "%s: skipped %d malformed rows of %d (data.skip_bad_rows=true); first: %s",
            files_field,
            stats.num_bad_rows,
            stats.num_rows,
            first_bad,
        )
    if stats.num_too_long:
        logger.warning(
            "%s: dropped %d of %d prompts longer than data.max_prompt_length=%d tokens",
            files_field,
            stats.num_too_long,
            stats.num_rows - stats.num_bad_rows,
            config.max_prompt_length,
        )
    logger.info("%s: %d prompts from %d rows in %d files", files_field, len(items), stats.num_rows, len(paths))
    if not items:
        raise InputError(
            f"{files_field}: no prompts left of {stats.num_rows} rows ({stats.num_bad_rows} malformed, "
            f"{stats.num_too_long} over data.max_prompt_length={config.max_prompt_length})"
        )
    return PromptSet(items, stats)


def read_rows(path: str) -> Iterator[tuple[str, dict | BadRow]]:
    """Yield ``(location, row)`` for every row of a JSONL or Parquet file; an unreadable row comes as a BadRow.

    Locations are ``path:line`` for JSONL (1-based file lines; blank lines are skipped) and ``path:row N`` for Parquet.
    """
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:  # bytes, so that a non-UTF-8 line is named instead of ending the read
            for line_number, raw in enumerate(f, start=1):
                location = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield location, BadRow(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}) — "
                                           "re-encode the file as UTF-8")  # fmt: skip
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield location, BadRow(f"invalid JSON ({e.msg} at column {e.colno}) — fix the line")
                    continue
                if not isinstance(row, dict):
                    yield location, BadRow(f"expected a JSON object, got {type(row).__name__} — fix the line")
                    continue
                yield location, row
    else:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        row_number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_number += 1
                yield f"{path}:row {row_number}", row


def make_prompt_item(row: dict | BadRow, location: str, index: int, tokenizer, config: DataConfig) -> PromptItem:
    """Check one row and turn it into a PromptItem; raise BadRow with what is wrong and how to fix it."""
    if isinstance(row, BadRow):
        raise row
    found, raw_prompt = lookup(row, config.prompt_key)
    if not found:
        raise BadRow(f"missing key {config.prompt_key!r} — set data.prompt_key or fix the row")
    check_prompt(raw_prompt, config)

    label = None
    if config.label_key is not None:
        found, label = lookup(row, config.label_key)
        if not found or label is None:
            found, label = lookup(row, VERL_LABEL_PATH)
        if not found or label is None:
            raise BadRow(f"missing key {config.label_key!r} — set data.label_key or fix the row")

    extra_info = row.get(config.metadata_key) or {}
    if not isinstance(extra_info, dict):
        raise BadRow(f"{config.metadata_key!r} must be an object, got {type(extra_info).__name__} — fix the row")
    data_source = row.get("data_source") or ""

    prompt_text = render_prompt(raw_prompt, tokenizer, config.apply_chat_template)
    return PromptItem(
        index=index,
        prompt_ids=[int(t) for t in tokenizer.encode(prompt_text, add_special_tokens=False)],
        label=label,
        raw_prompt=raw_prompt,
        prompt_text=prompt_text,
        data_source=str(data_source),
        extra_info=extra_info,
        source=location,
    )


def lookup(row: dict, key: str) -> tuple[bool, Any]:
    """``row[key]``, where a dotted key that is not itself a column walks nested objects."""
    if key in row:
        return True, row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def check_prompt(raw_prompt: Any, config: DataConfig) -> None:
    key = config.prompt_key
    if isinstance(raw_prompt, str):
        if not raw_prompt.strip():
            raise BadRow(f"{key!r} is empty — give the prompt text or drop the row")
        return
    if not isinstance(raw_prompt, list) or not raw_prompt:
        raise BadRow(
            f"{key!r} must be a string or a non-empty list of {{role, content}} messages, got "
            f"{type(raw_prompt).__name__} — fix the row"
        )
    for i, message in enumerate(raw_prompt):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise BadRow(f"{key!r}[{i}] must be a {{role, content}} message with string values — fix the row")
    if not config.apply_chat_template:
        raise BadRow(
            f"{key!r} is a list of chat messages but data.apply_chat_template is false — set it to true or give "
            "the prompt as a string"
        )


def render_prompt(raw_prompt: str | list[dict], tokenizer, apply_chat_template: bool) -> str:
    """The text the model sees: the chat template over the messages (a string is one user message), or the string."""
    if not apply_chat_template:
        return raw_prompt
    messages = [{"role": "user", "content": raw_prompt}] if isinstance(raw_prompt, str) else raw_prompt
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja templates raise their own errors, e.g. for roles out of order
        raise BadRow(f"the chat template rejects these messages ({type(e).__name__}: {e}) — fix the row") from None


@dataclass
class RunData:
    """What a training run reads before it starts: the tokenizer and the train/val prompts."""

    tokenizer: Any
    train: list[PromptItem]
    val: list[PromptItem]

    def __iter__(self):
        return iter((self.tokenizer, self.train, self.val))


def load_run_data(config) -> RunData:
    """The tokenizer of ``model.path`` and every prompt of ``data.train_files``/``data.val_files``, checked."""
    from megatron_sapo.config import resolve_total_steps
    from megatron_sapo.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.model.path)
    train = load_prompts(config.data, tokenizer).items
    resolve_total_steps(config.trainer, config.data, len(train))  # too few prompts for trainer.total_epochs: now
    val = load_prompts(config.data, tokenizer, "val").items if config.data.val_files else []
    return RunData(tokenizer, train, val)


class PromptStream:
    """An endless, resumable stream of prompts: epoch after epoch, each a fixed permutation of the prompt set.

    The order of epoch ``e`` is a pure function of ``(seed, e)``, and batches run across epoch boundaries, so the
    state is just ``(epoch, position)``: a run resumed from :meth:`state_dict` draws exactly the prompts the
    uninterrupted run would have. A batch can hold the same prompt twice when it spans two epochs (or is larger
    than the set), so callers should key groups by draw, not by ``PromptItem.index``.
    """

    def __init__(self, items: Sequence[PromptItem], *, shuffle: bool = True, seed: int = 1):
        if not items:
            raise InputError("data: the prompt set is empty")
        self.items = list(items)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            # A string seed is hashed with SHA-512 by ``random``, so the order does not depend on PYTHONHASHSEED.
            random.Random(f"megatron_sapo.prompts/{self.seed}/{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[PromptItem]:
        if size < 1:
            raise ValueError(f"batch size must be positive, got {size}")
        batch: list[PromptItem] = []
        while len(batch) < size:
            if self._order_epoch != self.epoch:
                self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
            stop = min(len(self.items), self.position + size - len(batch))
            batch.extend(self.items[i] for i in self._order[self.position : stop])
            self.position = stop
            if self.position == len(self.items):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_prompts": len(self.items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"seed": self.seed, "shuffle": self.shuffle, "num_prompts": len(self.items)}
        saved = {key: state.get(key) for key in expected}
        if saved != expected:
            raise InputError(
                f"resume: the checkpoint's prompt stream was {saved}, this run's is {expected}; resume with the "
                "same data.train_files, data.max_prompt_length, data.seed and data.shuffle"
            )
        if not 0 <= state["position"] < len(self.items) or state["epoch"] < 0:
            raise InputError(f"resume: prompt stream state {state} is out of range for {len(self.items)} prompts")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
