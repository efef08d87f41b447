"""The demo's arithmetic prompt set: deterministic, correct labels, even coverage, and scored by the math reward."""

import collections
import json
import re
import subprocess
import sys

import pytest

from megatron_sapo.data.arithmetic import arithmetic_rows, reference_response
from megatron_sapo.errors import InputError
from megatron_sapo.rewards.math import compute_score

PROMPT = re.compile(r"^What is (\d+)([+\-*])(\d+)\?$")


def solve(prompt: str) -> str:
    a, op, b = PROMPT.match(prompt).groups()
    return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])


def test_rows_are_deterministic_per_seed_and_correct():
    rows = arithmetic_rows(250, seed=3, operations="+-")
    assert rows == arithmetic_rows(250, seed=3, operations="+-")
    assert rows != arithmetic_rows(250, seed=4, operations="+-")
    assert all(set(row) == {"prompt", "label"} for row in rows)
    assert all(row["label"] == solve(row["prompt"]) for row in rows)
    assert any(row["label"].startswith("-") for row in rows)


def test_every_problem_appears_once_per_cycle():
    rows = arithmetic_rows(100, seed=0)  # single digits: 10 x 10 sums
    pairs = [PROMPT.match(row["prompt"]).group(1, 3) for row in rows]
    assert sorted(pairs) == [(str(a), str(b)) for a in range(10) for b in range(10)]
    counts = collections.Counter(row["prompt"] for row in arithmetic_rows(250, seed=0))
    assert sorted(set(counts.values())) == [2, 3]  # 250 = 2 full cycles + 50


def test_the_math_reward_scores_the_reference_response():
    for row in arithmetic_rows(20, seed=1, operations="+-*"):
        assert compute_score("", reference_response(row["label"]), row["label"]) == 1.0
        assert compute_score("", reference_response(int(row["label"]) + 1), row["label"]) == 0.0


def test_command_line_writes_the_same_rows(tmp_path):
    out = tmp_path / "data" / "train.jsonl"
    command = [sys.executable, "-m", "megatron_sapo.data.arithmetic", "--out", str(out), "--num", "7", "--seed", "3"]
    subprocess.run(command, check=True, capture_output=True)
    assert [json.loads(line) for line in out.read_text().splitlines()] == arithmetic_rows(7, seed=3)

    bad = subprocess.run(command + ["--operations", "/"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: operations='/': use a non-empty combination of +-*")


def test_bad_arguments():
    with pytest.raises(InputError, match=r"^num=0"):
        arithmetic_rows(0)
    with pytest.raises(InputError, match=r"^max_operand=-1"):
        arithmetic_rows(5, max_operand=-1)
