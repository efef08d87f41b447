"""Tokenizers: HF tokenizers for real checkpoints, a tiny sentencepiece model for tests and the demo.

A real checkpoint ships ``tokenizer.json``/``tokenizer_config.json`` and is loaded with ``AutoTokenizer``. The
tiny models made by ``tools/make_tiny_model.py`` ship a sentencepiece ``tokenizer.model`` instead (nothing
is downloaded at run time); :class:`SentencePieceTokenizer` gives it the small part of the HF tokenizer interface
that the package uses, including a ChatML chat template like Qwen's.
"""

from __future__ import annotations

import io
import os
import random
from typing import Sequence

from megatron_sapo.errors import InputError

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "\n")
CHATML_ROLE_PREFIX = "<|im_start|>{role}\n"
CHATML_TURN_END = "<|im_end|>\n"


class SentencePieceTokenizer:
    """The subset of the HF tokenizer interface used by the package, over a sentencepiece model."""

    def __init__(self, model_file: str):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.eos_token_id = self.sp.piece_to_id("<|im_end|>")
        self.bos_token_id = self.sp.bos_id()
        self.pad_token_id = self.sp.pad_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # A model's vocabulary may be larger than its tokenizer's (Qwen3's is); such ids decode to nothing.
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id and not self.sp.is_control(i)]
        return self.sp.decode(ids)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True, **_):
        text = "".join(CHATML_ROLE_PREFIX.format(role=m["role"]) + m["content"] + CHATML_TURN_END for m in messages)
        if add_generation_prompt:
            text += CHATML_ROLE_PREFIX.format(role="assistant")
        return self.encode(text) if tokenize else text


def load_tokenizer(path: str):
    """Load the tokenizer stored beside a checkpoint: HF files if present, else a sentencepiece model."""
    if os.path.exists(os.path.join(path, "tokenizer.json")) or os.path.exists(
        os.path.join(path, "tokenizer_config.json")
    ):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    sp_file = os.path.join(path, "tokenizer.model")
    if os.path.exists(sp_file):
        return SentencePieceTokenizer(sp_file)
    raise InputError(
        f"tokenizer: no tokenizer.json, tokenizer_config.json or tokenizer.model in {path}; "
        "point the tokenizer path at a checkpoint folder that has one"
    )


def tiny_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """Text for the tiny tokenizer: small arithmetic in the demo's wording plus plain words."""
    rng = random.Random(seed)
    words = (
        "the a of and to in is it that was for on are as with his they be at one have this from by hot word "
        "but what some we can out other were all there when up use your how said an each she which do their "
        "time if will way about many then them write would like so these her long make thing see him two has "
        "look more day could go come did number sound no most people my over know water than call first who "
        "may down side been now find answer question compute sum plus minus equals result solve think step user "
        "assistant system"
    ).split()
    lines = []
    for _ in range(num_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(f"What is {a}{op}{b}? Answer: {value}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + ".")
    return lines


def train_tiny_tokenizer(out_dir: str, vocab_size: int = 250, seed: int = 0) -> str:
    """Train a small sentencepiece BPE model (digits split, ChatML markers as single pieces)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed=seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=list(SPECIAL_TOKENS),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
