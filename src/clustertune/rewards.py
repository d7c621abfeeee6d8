"""Verifiable rewards and group-normalized advantages for GRPO (issue 15, item 3).

Used by train.objective = "grpo" (worker/objectives/grpo.py, the [grpo] section's `rewards`).

A reward function takes (completion, reference answer) and returns a float. Built-ins:

    exact_match            1.0 when the completion, stripped, equals the answer, stripped
    number_after_marker    1.0 when the number after the last "####" (GSM8K's marker) in the
                           completion equals the answer's (the number after its own marker, or the
                           answer itself)
    format                 1.0 when the completion has the marker followed by a number

A user reward function is named by import path, "package.module:function", with the same
signature. Launcher side: imports no torch.

    from clustertune.rewards import load_reward, group_advantages
    reward = load_reward("number_after_marker")
    advantages = group_advantages([reward(c, a) for c, a in pairs], group_size=8)
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

from clustertune.errors import UserError

Reward = Callable[[str, str], float]
MARKER = "####"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class RewardError(UserError):
    """A reward function that cannot be found or loaded."""


def exact_match(completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())


def number_after(text: str, marker: str = MARKER) -> float | None:
    """The first number after the last `marker` in text (commas as thousands separators), or
    None when there is no marker or no number after it."""
    _, found, tail = text.rpartition(marker)
    if not found:
        return None
    match = _NUMBER.search(tail)
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def number_after_marker(completion: str, answer: str, marker: str = MARKER) -> float:
    got = number_after(completion, marker)
    expected = number_after(answer, marker) if marker in answer else number_after(marker + answer, marker)
    return float(got is not None and expected is not None and math.isclose(got, expected, rel_tol=0, abs_tol=1e-9))


def format_check(completion: str, answer: str = "", marker: str = MARKER) -> float:
    return float(number_after(completion, marker) is not None)


BUILTIN_REWARDS: dict[str, Reward] = {
    "exact_match": exact_match,
    "number_after_marker": number_after_marker,
    "format": format_check,
}


def load_reward(spec: str) -> Reward:
    """A built-in reward by name, or a user function by import path "module:function"."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise RewardError(f"reward {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}) or an import path "
                          "'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r}: {err}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"reward {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def group_advantages(rewards: Sequence[float], *, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> list[float]:
    """GRPO's advantages: each reward minus its group's mean, divided by the group's standard
    deviation (population, + eps) when `scale`. Groups are consecutive runs of `group_size`."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


def share_without_spread(rewards: Sequence[float], *, group_size: int) -> float:
    """The share of groups whose rewards are all equal (they teach nothing: zero advantages)."""
    groups = [rewards[s:s + group_size] for s in range(0, len(rewards), group_size)]
    return sum(max(g) == min(g) for g in groups) / max(1, len(groups))
