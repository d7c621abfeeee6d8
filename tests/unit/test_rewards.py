"""GRPO groundwork: built-in verifiable rewards, user rewards by import path, group-normalized
advantages (pure; no processes).

    python -m pytest tests/unit/test_rewards.py -q
"""

from __future__ import annotations

import math

import pytest

from clustertune.rewards import (RewardError, exact_match, format_check, group_advantages, load_reward,
                                 number_after, number_after_marker, share_without_spread)


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" cba\n", "cba") == 1.0
    assert exact_match("c ba", "cba") == 0.0


def test_number_after_the_last_marker():
    assert number_after("so 3 + 4 = 7\n#### 7") == 7.0
    assert number_after("#### 1 then #### 1,250.5 apples") == 1250.5
    assert number_after("#### -3") == -3.0
    assert number_after("the answer is 7") is None
    assert number_after("#### none") is None
    assert number_after_marker("work... #### 72", "Natalia sold 48/2 = 24 clips...\n#### 72") == 1.0
    assert number_after_marker("#### 72", "72") == 1.0
    assert number_after_marker("#### 71", "72") == 0.0
    assert number_after_marker("72", "72") == 0.0  # no marker: the format is part of the task


def test_format_check():
    assert format_check("reasoning\n#### 12") == 1.0
    assert format_check("12") == 0.0


def test_load_reward_builtin_and_import_path():
    assert load_reward("exact_match") is exact_match
    assert load_reward("math:isclose") is math.isclose
    for spec, words in [("nope", "built-in"), ("no_such_module_x:f", "cannot import"), ("math:nope", "no function")]:
        with pytest.raises(RewardError, match=words):
            load_reward(spec)


def test_group_advantages_normalize_within_each_group():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    adv = group_advantages(rewards, group_size=4)
    assert adv[:4] == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-3)  # mean 0.5, std 0.5
    assert adv[4:] == [0.0] * 4  # no spread: nothing to learn
    assert group_advantages(rewards, group_size=4, scale=False)[:4] == [0.5, -0.5, -0.5, 0.5]
    assert share_without_spread(rewards, group_size=4) == 0.5
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size=3)
