"""Reinforcement learning after SFT: the clipped objectives (GRPO / LPO / GSPO), LPO's sentence
units, the Evo-CoT rewards, the GAR arena adapter and group advantages."""

from ling_jax.rl.advantages import group_advantages
from ling_jax.rl.arena import arena_reward
from ling_jax.rl.objectives import DEFAULT_EPS, LEVELS, policy_loss
from ling_jax.rl.rewards import (
    Reward,
    RewardError,
    correctness_reward,
    format_reward,
    length_reward,
    length_reward_fn,
    score,
)
from ling_jax.rl.units import sentence_unit_ids

__all__ = [
    "DEFAULT_EPS",
    "LEVELS",
    "Reward",
    "RewardError",
    "arena_reward",
    "correctness_reward",
    "format_reward",
    "group_advantages",
    "length_reward",
    "length_reward_fn",
    "policy_loss",
    "score",
    "sentence_unit_ids",
]
