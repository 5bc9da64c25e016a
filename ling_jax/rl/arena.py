"""GAR (generative arena reward) adapter: a judge compares the completions of one group
round-robin, in pairs, and each completion's reward is its number of wins.

`judge(prompt, a, b) -> float` is the share of the win that goes to `a` (1.0: a wins, 0.0: b wins,
0.5: a tie); `b` gets the rest. Every unordered pair of a group is judged once, so with G
completions each one plays G - 1 games and the rewards of a group sum to G (G - 1) / 2.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

Judge = Callable[[str, str, str], float]


def arena_reward(judge: Judge):
    """A reward function (see ling_jax.rl.rewards) of win counts within each `group`."""

    def arena(prompts, completions, *, group, **_):
        group_N = np.asarray(group)
        wins = np.zeros(len(completions), np.float64)
        for g in np.unique(group_N):
            for i, j in itertools.combinations(np.flatnonzero(group_N == g).tolist(), 2):
                share = float(judge(prompts[i], completions[i], completions[j]))
                if not (math.isfinite(share) and 0.0 <= share <= 1.0):
                    raise ValueError(
                        f"the judge returned {share!r} for completions {i} and {j}; expected a number in [0, 1]"
                    )
                wins[i] += share
                wins[j] += 1.0 - share
        return wins.tolist()

    return arena
