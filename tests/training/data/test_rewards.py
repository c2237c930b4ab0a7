"""training/data/rewards.py: the built-in rewards, their weighting, and a user's reward function
that is missing, raises or returns the wrong thing, each named in one line."""

from __future__ import annotations

import pytest

from training.data.rewards import RewardError, Rewards, exact_match_reward, format_reward, partial_match_reward

RECORDS = [{"instruction": "Reverse the order of the words.", "input": "cat dog sun", "output": "sun dog cat"}]


def test_built_in_rewards():
    completions = ["sun dog cat", " sun dog cat\n", "sun cat dog", "", "a\nb"]
    output = ["sun dog cat"] * 5
    assert exact_match_reward(completions, output=output) == [1.0, 1.0, 0.0, 0.0, 0.0]
    partial = partial_match_reward(completions, output=output)
    assert partial[:2] == [1.0, 1.0] and 0.5 < partial[2] < 1.0 and partial[3] == 0.0
    stopped = [True, True, True, True, False]
    assert format_reward(completions, stopped=stopped) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_rewards_are_weighted_and_a_bad_function_is_named_in_one_line(tmp_path, monkeypatch):
    rewards = Rewards.load(["exact_match", "partial_match"], [1.0, 0.5])
    total, each = rewards.score(["sun dog cat", "x"], [RECORDS[0]] * 2, stopped=[True, True])
    assert total == [1.5, 0.5 * each["partial_match"][1]] and each["exact_match"] == [1.0, 0.0]
    (tmp_path / "user_rewards.py").write_text(
        "def length(completions, **kw):\n    return [len(c) for c in completions]\n"
        "def boom(completions, **kw):\n    raise RuntimeError('no')\n"
        "def short(completions, **kw):\n    return [1.0]\n"
        "def text(completions, **kw):\n    return ['a' for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    assert Rewards.load(["user_rewards:length"], None).score(["ab", "c"], [RECORDS[0]] * 2)[0] == [2.0, 1.0]
    cases = {
        "nowhere:f": r"no module named 'nowhere'",
        "user_rewards:missing": r"user_rewards has no function 'missing'",
        "user_rewards:boom": r"'user_rewards:boom' raised RuntimeError\('no'\)",
        "user_rewards:short": r"returned 1 values for 2 completions",
        "user_rewards:text": r"returned 'a', not a number",
        "nonsense": r"unknown reward function 'nonsense'",
    }
    for spec, message in cases.items():
        with pytest.raises(RewardError, match=message):
            Rewards.load([spec], None).score(["ab", "c"], [RECORDS[0]] * 2)
