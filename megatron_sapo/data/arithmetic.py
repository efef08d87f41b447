"""The demo's toy task: small arithmetic prompts with their answers, written as a prompt set (JSONL).

Rows read ``{"prompt": "What is 3+4?", "label": "7"}``, in the wording of the tiny tokenizer's corpus, so a
~200k-parameter model can learn the task on CPU in minutes. The expected response is ``Answer: 7`` (see
:func:`reference_response`): the math reward takes its last number, so it is scored without ambiguity.

    python -m megatron_sapo.data.arithmetic --out train.jsonl --num 1000 --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys

from megatron_sapo.errors import InputError

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problems(max_operand: int = 9, operations: str = "+") -> list[tuple[int, str, int]]:
    """Every ``(a, op, b)`` with ``0 <= a, b <= max_operand``, in a fixed order."""
    unknown = set(operations) - set(OPERATIONS)
    if unknown or not operations:
        raise InputError(f"operations={operations!r}: use a non-empty combination of {''.join(OPERATIONS)}")
    if max_operand < 0:
        raise InputError(f"max_operand={max_operand}: must be >= 0")
    operands = range(max_operand + 1)
    return [(a, op, b) for op in operations for a, b in itertools.product(operands, operands)]


def arithmetic_rows(num: int, seed: int = 0, max_operand: int = 9, operations: str = "+") -> list[dict[str, str]]:
    """``num`` prompt rows: the problems shuffled by ``seed`` and cycled, so every problem appears as evenly as
    ``num`` allows (each exactly once when ``num`` equals the number of problems)."""
    if num < 1:
        raise InputError(f"num={num}: must be a positive number of rows")
    problems = arithmetic_problems(max_operand, operations)
    random.Random(seed).shuffle(problems)
    rows = []
    for a, op, b in itertools.islice(itertools.cycle(problems), num):
        rows.append({"prompt": f"What is {a}{op}{b}?", "label": str(OPERATIONS[op](a, b))})
    return rows


def reference_response(label: str | int) -> str:
    """The response the demo teaches (e.g. in a supervised warm start); the math reward scores it 1."""
    return f"Answer: {label}"


def write_arithmetic_jsonl(path: str, num: int, seed: int = 0, max_operand: int = 9, operations: str = "+") -> str:
    rows = arithmetic_rows(num, seed, max_operand, operations)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo's arithmetic prompt set as JSONL.")
    parser.add_argument("--out", required=True, help="output .jsonl path")
    parser.add_argument("--num", type=int, default=1000, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=9, help="operands are 0..max-operand")
    parser.add_argument("--operations", default="+", help="any of '+-*'")
    args = parser.parse_args(argv)
    try:
        write_arithmetic_jsonl(args.out, args.num, args.seed, args.max_operand, args.operations)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.num} rows to {args.out}")


if __name__ == "__main__":
    main()
