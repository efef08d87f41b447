"""Rule-based math reward: 1 when the response's final answer equals the label, else 0.

The final answer is the content of the last ``\\boxed{...}`` in the response or, without one, its last number.
Equality is decided by math-verify (numeric within its precision, then symbolic with sympy), so ``0.5``,
``\\frac{1}{2}`` and ``1/2`` agree, as do ``1,000`` and ``1000``.

math-verify guards its sympy calls with ``signal.alarm``, which only works in a process's main thread; it is
called here with those timeouts off, and the reward workers (:mod:`megatron_sapo.rewards.workers`) time out the
whole call instead, wherever the trainer runs it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify


class _DropTimeoutDisabledWarning(logging.Filter):
    # math-verify warns once per process that its own timeout is off; here that is by design (see above).
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

# A number: optional sign (a minus directly after a word, digit or bracket is subtraction, not a sign), then
# digits with optional thousands separators, an optional decimal part, and an optional ``/denominator``.
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_LATEX_ONLY = [LatexExtractionConfig()]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``, else None."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for end in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    return text[start + 1 : end].strip()
            continue  # unbalanced braces: try an earlier box
        # ``\boxed 5``: the argument runs to the next space or ``$``.
        argument = re.match(r"[^\s$]+", text[start:])
        if argument and match.group().endswith((" ", "\t", "\n")):
            return argument.group()
    return None


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_final_answer(response: str) -> str | None:
    """The response's final answer: the last ``\\boxed{}`` content, else its last number, else None."""
    boxed = last_boxed(response)
    return boxed if boxed is not None else last_number(response)


def _parse(answer: str):
    # Wrapping in \boxed{} makes math-verify take the whole string as one LaTeX expression.
    return parse(f"\\boxed{{{answer}}}", extraction_config=_LATEX_ONLY, parsing_timeout=None)


def answers_equal(answer: str, label: Any) -> bool:
    """Whether ``answer`` equals ``label`` numerically or symbolically (a ``\\boxed{}`` label counts by its box)."""
    label = str(label).strip()
    label = last_boxed(label) or label
    gold, predicted = _parse(label), _parse(answer)
    if not gold or not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=None))


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """The ``math`` reward, in the reward-function convention of :mod:`megatron_sapo.rewards.registry`."""
    answer = extract_final_answer(solution_str)
    return 1.0 if answer is not None and answers_equal(answer, ground_truth) else 0.0
