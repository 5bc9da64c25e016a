"""Group-relative advantages: A_i = (R_i - mean of its group) / (std of its group + 1e-6).

Rewards are laid out group by group (the G completions of prompt 0, then of prompt 1, ...). The
standard deviation is the population one (ddof=0). A group whose rewards are all equal — G = 1
included — gets advantage exactly 0 (R_i - mean = 0), so it contributes no gradient; it never
produces a NaN. (`RLConfig` refuses group_size < 2 before a run starts: with one sample per prompt
every advantage is 0 and nothing would be learnt.)
"""

from __future__ import annotations

import numpy as np

STD_EPS = 1e-6


def group_advantages(rewards_N, group_size: int) -> np.ndarray:
    """[N] float32 advantages of N = P * group_size rewards, normalised within each group."""
    rewards_N = np.asarray(rewards_N, np.float64)
    if rewards_N.ndim != 1:
        raise ValueError(f"rewards must be a 1-D array, got shape {rewards_N.shape}")
    if group_size < 1 or rewards_N.size % group_size:
        raise ValueError(f"{rewards_N.size} rewards cannot be split into groups of group_size={group_size}")
    if not np.all(np.isfinite(rewards_N)):
        bad = np.flatnonzero(~np.isfinite(rewards_N))
        raise ValueError(f"rewards hold non-finite values at {bad[:5].tolist()}: refusing to compute advantages")
    r_PG = rewards_N.reshape(-1, group_size)
    centred_PG = r_PG - r_PG.mean(axis=1, keepdims=True)
    # Exactly zero for an all-equal group (the mean of equal floats can differ from them by an ulp).
    centred_PG = np.where(np.ptp(r_PG, axis=1, keepdims=True) == 0, 0.0, centred_PG)
    return (centred_PG / (r_PG.std(axis=1, keepdims=True) + STD_EPS)).reshape(-1).astype(np.float32)
