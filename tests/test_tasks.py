"""The embedded arithmetic task: reproducible splits that never overlap, exact traces, a strict checker."""

from __future__ import annotations

import numpy as np
import pytest

from ling_jax.tasks import arithmetic as task


def test_splits_are_reproducible_and_disjoint():
    heldout = task.make_split("heldout", 500, seed=0)
    assert heldout == task.make_split("heldout", 500, seed=0)
    assert len(set(heldout)) == 500  # distinct
    assert heldout != task.make_split("heldout", 500, seed=1)
    train = task.make_split("train", 20_000, seed=0) + task.make_split("train", 5_000, seed=7)
    assert not set(train) & set(heldout)
    assert not set(train) & set(task.make_split("heldout", 500, seed=3))
    assert all(p.split == "train" for p in train) and all(p.split == "heldout" for p in heldout)
    # the held-out share of the problem space is what the buckets say (about 5%)
    rng = np.random.default_rng(0)
    draws = [task._draw(rng, task.TaskConfig()) for _ in range(20_000)]
    share = np.mean([task.split_of(p) == "heldout" for p in draws])
    assert abs(share - task.HELDOUT_BUCKETS / task.SPLIT_BUCKETS) < 0.01


def test_problem_family_and_bad_arguments():
    config = task.TaskConfig(max_digits=2, ops=("-",))
    problems = task.make_split("train", 2_000, seed=0, config=config)
    assert all(p.op == "-" and 0 <= p.b <= p.a < 100 for p in problems)
    assert {p.op for p in task.make_split("train", 500, seed=0)} == {"+", "-"}
    with pytest.raises(ValueError, match="unknown split 'test'"):
        task.make_split("test", 5)
    with pytest.raises(ValueError, match="raise max_digits"):
        task.make_split("heldout", 500, config=task.TaskConfig(max_digits=1))
    with pytest.raises(ValueError, match="ops"):
        task.TaskConfig(ops=("*",))
    with pytest.raises(ValueError, match="max_digits"):
        task.TaskConfig(max_digits=0)


@pytest.mark.parametrize(
    "a, b, op, trace",
    [
        (347, 85, "+", "<think>7+5+0=12,4+8+1=13,3+0+1=04</think>432"),
        (999, 1, "+", "<think>9+1+0=10,9+0+1=10,9+0+1=10</think>1000"),
        (523, 187, "-", "<think>3-7-0=16,2-8-1=13,5-1-1=03</think>336"),
        (7, 7, "-", "<think>7-7-0=00</think>0"),
    ],
)
def test_traces(a, b, op, trace):
    p = task.Problem(a, b, op)
    assert task.sft_trace(p, think=True) == trace
    assert task.sft_trace(p, think=False) == str(a + b if op == "+" else a - b)
    assert task.check(trace, p) and task.check(task.sft_trace(p, think=False), p)


def test_verbose_trace_adds_only_the_filler_sentence():
    p = task.Problem(347, 85, "+")
    verbose = task.sft_trace(p, think=True, verbose=True)
    assert verbose == "<think>7+5+0=12,4+8+1=13,3+0+1=04,all done</think>432"
    assert len(verbose) == len(task.sft_trace(p, think=True)) + len("," + task.VERBOSE_STEP)
    assert task.check(verbose, p)
    with pytest.raises(ValueError, match="verbose=True needs think=True"):
        task.sft_trace(p, think=False, verbose=True)


def test_trace_columns_recompute_the_answer():
    """Each column step is arithmetic that holds, and the digits it writes spell the answer."""
    for p in task.make_split("train", 2_000, seed=5):
        digits, carry = [], 0
        for step in task.think_steps(p):
            lhs, rhs = step.split("=")
            x, y, c = (int(v) for v in lhs.split(p.op))
            assert c == carry
            out, digit = int(rhs[0]), int(rhs[1])
            if p.op == "+":
                assert 10 * out + digit == x + y + c
            else:
                assert digit - 10 * out == x - y - c
            digits.append(digit)
            carry = out
        if p.op == "+":
            digits.append(carry)
        assert int("".join(map(str, reversed(digits)))) == p.value


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("432", True),
        ("  432\n", True),
        ("432<|role_end|>", True),
        ("= 432", True),
        ("Answer: 432.", True),
        ("0432", True),
        ("<think>7+5+0=12</think>432", True),
        ("<think>the answer is 431</think> 432", True),
        ("<think>432</think>431", False),  # the answer is after the thinking
        ("<think>7+5+0=12,432", False),  # thinking never closed: no answer
        ("431 432", False),  # hedging with several numbers
        ("432 433", False),
        ("432abc", False),
        ("", False),
        ("<think></think>", False),
        ("-432", False),
        ("4 32", False),
        ("forty-two", False),
        ("432</think>1", False),
    ],
)
def test_check_is_exact(completion, ok):
    assert task.check(completion, task.Problem(347, 85, "+")) is ok


def test_check_negative_and_zero():
    assert task.check("0", task.Problem(5, 5, "-"))
    assert task.check("-3", task.Problem(2, 5, "-"))  # a hand-made problem with a negative answer
    assert not task.check("3", task.Problem(2, 5, "-"))
