"""Rewards, LPO's sentence units, the GAR arena adapter and group advantages, with their bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from ling_jax.rl import (
    Reward,
    RewardError,
    arena_reward,
    correctness_reward,
    format_reward,
    group_advantages,
    length_reward,
    length_reward_fn,
    score,
    sentence_unit_ids,
)


def test_sentence_units_ascii_cjk_and_bpe_pieces():
    byte_pieces = list("ab, cd.\nef")
    np.testing.assert_array_equal(sentence_unit_ids(byte_pieces), [0, 0, 0, 1, 1, 1, 1, 2, 3, 3])
    cjk = ["我", "们", "，", "好", "。", "是", "、", "吗", "？"]
    np.testing.assert_array_equal(sentence_unit_ids(cjk), [0, 0, 0, 1, 1, 2, 2, 3, 3])
    bpe = [" Hello", " world.", " Then", ";", " more", "!\n", "x"]
    np.testing.assert_array_equal(sentence_unit_ids(bpe), [0, 0, 1, 1, 2, 2, 3])
    for mark in "!?;:":
        assert sentence_unit_ids(["a", mark, "b"]).tolist() == [0, 0, 1]
    assert sentence_unit_ids([]).shape == (0,)


def test_length_reward_formula():
    lengths = np.array([10, 20, 30, 40])
    correct = np.array([True, True, False, False])
    p = 0.5 - (lengths - 10) / (30 + 1e-9)
    expected = 0.7 * np.array([p[0], p[1], min(p[2], 0), min(p[3], 0)])
    np.testing.assert_allclose(length_reward(lengths, correct, 0.7), expected, rtol=1e-6)
    # a wrong short answer never gains; equal lengths: p = 0.5 for everyone
    assert length_reward([5, 9], [False, True], 1.0)[0] == 0.0
    np.testing.assert_allclose(length_reward([7, 7], [True, False], 1.0), [0.5, 0.0])


def check(completion, answer, **_):
    return completion.strip() == answer


def test_length_reward_in_solved_groups_only():
    # group 0: one correct answer; group 1: none, so its wrong answers would be ranked by length alone
    completions, answers = ["2", "22", "3", "33"], ["2", "2", "1", "1"]
    columns = dict(answer=answers, group=[0, 0, 1, 1], lengths=[2, 3, 2, 3])
    every_group = length_reward_fn(check, 1.0)(["q"] * 4, completions, **columns)
    solved = length_reward_fn(check, 1.0, solved_groups_only=True)(["q"] * 4, completions, **columns)
    np.testing.assert_allclose(every_group, [0.5, -0.5, 0.0, -0.5], atol=1e-6)
    np.testing.assert_allclose(solved, [0.5, -0.5, 0.0, 0.0], atol=1e-6)


def test_score_composes_weighted_rewards():
    prompts = ["1+1"] * 4
    completions = ["2", "<think>x</think>2", "3", "22"]
    cols = dict(answer=["2"] * 4, group=[0, 0, 1, 1], lengths=[1, 17, 1, 2])
    rewards = [
        Reward("correctness", correctness_reward(check), 1.0),
        Reward("format", format_reward, 1.0),
        Reward("length", length_reward_fn(check, 0.5), 2.0),
    ]
    total, parts = score(rewards, prompts, completions, **cols)
    np.testing.assert_array_equal(parts["correctness"], [1, 0, 0, 0])
    np.testing.assert_array_equal(parts["format"], [0, -0.5, 0, 0])
    np.testing.assert_allclose(parts["length"][:2], length_reward([1, 17], [True, False], 0.5))
    np.testing.assert_allclose(total, parts["correctness"] + parts["format"] + 2 * parts["length"], rtol=1e-6)
    # think-on mode: <think> is allowed
    assert format_reward(prompts[:1], completions[1:2], think=[True]) == [0.0]


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda p, c, **_: 1 / 0, "'bad' raised ZeroDivisionError"),
        (lambda p, c, **_: [float("nan")] * len(c), "'bad' returned non-finite rewards at completions \\[0, 1\\]"),
        (lambda p, c, **_: [1.0], "'bad' returned 1 values .* expected 2"),
        (lambda p, c, **_: ["x", "y"], "'bad' returned non-numbers"),
    ],
)
def test_bad_reward_functions_are_named(fn, message):
    with pytest.raises(RewardError, match=message):
        score([Reward("ok", format_reward), Reward("bad", fn)], ["a", "b"], ["1", "2"])


def test_arena_round_robin_win_counts():
    # Toy judge: the longer completion wins, equal lengths tie.
    def judge(prompt, a, b):
        return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5

    completions = ["aaa", "a", "aa", "aa", "x", "yyyy"]
    group = [0, 0, 0, 0, 1, 1]
    wins = arena_reward(judge)(["p"] * 6, completions, group=group)
    assert wins == [3.0, 0.0, 1.5, 1.5, 0.0, 1.0]
    assert sum(wins[:4]) == 4 * 3 / 2  # G (G - 1) / 2 games per group
    calls = []
    arena_reward(lambda p, a, b: calls.append((a, b)) or 0.5)(["p"] * 4, list("abcd"), group=[0] * 4)
    assert len(calls) == 6 and len(set(calls)) == 6
    with pytest.raises(RewardError, match="'gar' raised ValueError: the judge returned 2.0"):
        score([Reward("gar", arena_reward(lambda p, a, b: 2.0))], ["p", "p"], ["a", "b"], group=[0, 0])


def test_group_advantages():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4)
    g = r[:4]
    np.testing.assert_allclose(adv[:4], (g - g.mean()) / (g.std() + 1e-6), rtol=1e-6)
    assert np.all(adv[4:] == 0)  # all-equal rewards: exactly zero, never NaN
    # G = 1: no group variance -> zero advantage (documented; the RL config refuses group_size < 2)
    assert np.all(group_advantages([0.3, 1.0, -2.0], 1) == 0)
    assert np.all(group_advantages([0.1] * 3, 3) == 0)  # equal floats whose mean is not exactly 0.1
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="groups of group_size=3"):
        group_advantages([1.0, 2.0], 3)
