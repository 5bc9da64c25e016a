"""Evo-CoT rewards as composable functions, and their weighted sum.

A reward function has the shape `fn(prompts, completions, **columns) -> list[float]`: one reward
per completion. `columns` are the example's fields repeated per completion (e.g. `answer`) plus
what the RL loop knows about each completion: `group` (the index of its prompt's group) and
`lengths` (its token count). Functions ignore the columns they do not read (`**_`).

`score` calls each function, checks what it returned (the right count, finite numbers; an
exception is re-raised naming the function) and sums them with their weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

RewardFn = Callable[..., Sequence[float]]
THINK_OPEN = "<think>"
FORMAT_PENALTY = -0.5


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it."""


def length_reward(lengths_G, correct_G, alpha: float) -> np.ndarray:
    """[G] float32 alpha * R^ over one group of G samples of a prompt (Ling 2.0's Evo-CoT):
    p(l) = 0.5 - (l - l_min) / (l_max - l_min + 1e-9), R^ = p(l) if correct else min(p(l), 0).
    Shorter correct answers earn up to +0.5 * alpha; no wrong answer earns a positive length reward."""
    lengths_G = np.asarray(lengths_G, np.float64)
    correct_G = np.asarray(correct_G, bool)
    if lengths_G.ndim != 1 or lengths_G.shape != correct_G.shape:
        raise ValueError(f"lengths_G {lengths_G.shape} and correct_G {correct_G.shape} must be equal 1-D shapes")
    if lengths_G.size == 0:
        return np.zeros(0, np.float32)
    l_min, l_max = lengths_G.min(), lengths_G.max()
    p_G = 0.5 - (lengths_G - l_min) / (l_max - l_min + 1e-9)
    return (alpha * np.where(correct_G, p_G, np.minimum(p_G, 0.0))).astype(np.float32)


def correctness_reward(check: Callable[..., bool]) -> RewardFn:
    """+1 / 0 from `check(completion, **row)` (row: this completion's example columns)."""

    def correctness(prompts, completions, **columns):
        rows = _rows(len(completions), columns)
        return [1.0 if check(c, **row) else 0.0 for c, row in zip(completions, rows)]

    return correctness


def format_reward(prompts, completions, think=None, **_) -> list[float]:
    """-0.5 for a completion containing `<think>` in think-off mode (`think` False or absent), else 0."""
    modes = [False] * len(completions) if think is None else list(think)
    return [FORMAT_PENALTY if (not on and THINK_OPEN in c) else 0.0 for c, on in zip(completions, modes)]


def length_reward_fn(check: Callable[..., bool], alpha: float, *, solved_groups_only: bool = False) -> RewardFn:
    """The length reward over each group (needs the `group` and `lengths` columns); correctness
    from `check` as in `correctness_reward`.

    `solved_groups_only`: a group with no correct completion gets length reward 0. In such a group
    the reward ranks wrong answers by length alone, and group normalisation
    (ling_jax.rl.advantages) scales that ranking to unit advantages whatever alpha is, so a policy
    that solves few problems is taught to shorten everything, its reasoning included
    (benchmarks/README.md, "RL objectives", measures that collapse)."""

    def length(prompts, completions, *, group, lengths, **columns):
        correct_N = np.asarray(correctness_reward(check)(prompts, completions, **columns)) > 0
        group_N, lengths_N = np.asarray(group), np.asarray(lengths, np.float64)
        out = np.zeros(len(completions), np.float32)
        for g in np.unique(group_N):
            idx = np.flatnonzero(group_N == g)
            if solved_groups_only and not correct_N[idx].any():
                continue
            out[idx] = length_reward(lengths_N[idx], correct_N[idx], alpha)
        return out.tolist()

    return length


def _rows(n: int, columns: dict) -> list[dict]:
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def score(rewards: Sequence[Reward], prompts, completions, **columns) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total [N] float32 = sum of weight * fn(...), {name: [N] unweighted rewards}). Raises
    RewardError naming the function that raised, returned the wrong count or a non-finite value."""
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(f"{len(prompts)} prompts for {n} completions: pass one prompt per completion")
    for key, value in columns.items():
        if len(value) != n:
            raise RewardError(f"column {key!r} has {len(value)} entries for {n} completions")
    total = np.zeros(n, np.float64)
    parts = {}
    for r in rewards:
        try:
            values = r.fn(prompts, completions, **columns)
        except Exception as e:
            raise RewardError(f"reward function {r.name!r} raised {type(e).__name__}: {e}") from e
        try:
            values = np.asarray(values, np.float64)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward function {r.name!r} returned non-numbers: {e}") from e
        if values.shape != (n,):
            raise RewardError(
                f"reward function {r.name!r} returned {values.size} values (shape {values.shape}); "
                f"expected {n}, one per completion"
            )
        if not np.all(np.isfinite(values)):
            bad = np.flatnonzero(~np.isfinite(values))
            raise RewardError(
                f"reward function {r.name!r} returned non-finite rewards at completions {bad[:5].tolist()}"
            )
        if not math.isfinite(r.weight):
            raise RewardError(f"reward {r.name!r} has a non-finite weight {r.weight}")
        parts[r.name] = values.astype(np.float32)
        total += r.weight * values
    return total.astype(np.float32), parts
