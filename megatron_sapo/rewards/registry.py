"""Reward functions: the built-in ones by name, user ones by ``module:function`` or ``path/file.py:function``.

Every reward function, built-in or custom, is called the way verl calls ``compute_score``, so verl reward files
work unchanged::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

``solution_str`` is the response decoded without special tokens, ``ground_truth`` the row's label,
``data_source``/``extra_info`` the row's fields of those names. A dict result must hold the reward at ``"score"``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from megatron_sapo.errors import InputError
from megatron_sapo.rewards.config import RewardConfig

BUILTIN_REWARD_FUNCTIONS = {
    "math": "megatron_sapo.rewards.math:compute_score",
    "exact_match": "megatron_sapo.rewards.exact_match:compute_score",
}

RewardFunction = Callable[..., Any]


@dataclass(frozen=True)
class RewardSample:
    """One response to score, with its prompt's label and row fields."""

    response: str
    label: Any
    data_source: str = ""
    extra_info: dict | None = None

    def call_kwargs(self) -> dict[str, Any]:
        return dict(
            data_source=self.data_source,
            solution_str=self.response,
            ground_truth=self.label,
            extra_info=self.extra_info if self.extra_info is not None else {},
        )


def reward_function_spec(config: RewardConfig) -> str:
    return config.custom_function if config.type == "custom" else BUILTIN_REWARD_FUNCTIONS[config.type]


def split_function_spec(spec: str, field: str = "reward.custom_function") -> tuple[str, str, bool]:
    """``(module or file, function name, is_file)``; checks the form and that a file exists, imports nothing."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise InputError(f"{field}={spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if is_file and not os.path.isfile(target):
        raise InputError(f"{field}: no such file {os.path.abspath(target)}")
    return target, name, is_file


def load_reward_function(spec: str, field: str = "reward.custom_function") -> RewardFunction:
    """Import ``package.module:function`` or ``path/to/file.py:function``; bad specs raise InputError."""
    target, name, is_file = split_function_spec(spec, field)
    if is_file:
        module = _import_file(target, field)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise InputError(f"{field}: cannot import {target!r} ({e}); check the name and PYTHONPATH") from None
        except Exception as e:
            raise InputError(f"{field}: importing {target} failed: {type(e).__name__}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"{field}: {target} has no function {name!r}")
    if inspect.iscoroutinefunction(function):
        raise InputError(f"{field}: {spec} is async; give a plain function (it may call asyncio.run itself)")
    return function


def _import_file(path: str, field: str):
    path = os.path.abspath(path)
    # One module per file, registered in sys.modules so that pickling and dataclasses inside it work.
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = f"megatron_sapo_user_reward_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise InputError(f"{field}: importing {path} failed: {type(e).__name__}: {e}") from None
    return module


def score_of(result: Any) -> float:
    """The reward in a reward function's result; a result that is not a finite number raises."""
    if isinstance(result, dict):
        if "score" not in result:
            raise TypeError(f"returned a dict without a 'score' key: {sorted(result)}")
        result = result["score"]
    if not isinstance(result, numbers.Real):
        raise TypeError(f"returned {type(result).__name__}, not a number")
    value = float(result)
    if not math.isfinite(value):
        raise ValueError(f"returned {value}")
    return value
