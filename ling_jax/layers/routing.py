"""Ling 2.0 router math: sigmoid scores, aux-loss-free expert bias, group-limited top-k.

Selection uses the biased scores s + b; the weights are the UNBIASED s at the chosen experts,
renormalised (when k > 1) and multiplied by the routed scaling factor. Ties go to the lowest
expert index (as torch.topk / lax.top_k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_limited_topk(biased_NE: jax.Array, *, top_k: int, n_group: int, topk_group: int) -> jax.Array:
    """Expert ids [N, k] (descending biased score) chosen inside the topk_group best groups.

    A group's score is the sum of its two best biased scores; the other groups are masked out.
    """
    N, E = biased_NE.shape
    grouped_NGe = biased_NE.reshape(N, n_group, E // n_group)
    group_scores_NG = jax.lax.top_k(grouped_NGe, 2)[0].sum(axis=-1)
    _, kept_groups_Ng = jax.lax.top_k(group_scores_NG, topk_group)
    group_mask_NG = jnp.zeros((N, n_group), bool).at[jnp.arange(N)[:, None], kept_groups_Ng].set(True)
    expert_mask_NE = jnp.repeat(group_mask_NG, E // n_group, axis=1)
    masked_NE = jnp.where(expert_mask_NE, biased_NE, -jnp.inf)
    return jax.lax.top_k(masked_NE, top_k)[1].astype(jnp.int32)


def route(
    logits_NE: jax.Array,
    expert_bias_E: jax.Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """(expert_ids [N, k] int32, weights [N, k] float32) for router logits [N, E]."""
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    biased_NE = jax.lax.stop_gradient(scores_NE) + expert_bias_E.astype(jnp.float32)
    ids_Nk = group_limited_topk(biased_NE, top_k=top_k, n_group=n_group, topk_group=topk_group)
    chosen_Nk = jnp.take_along_axis(scores_NE, ids_Nk, axis=-1)
    if top_k > 1:
        chosen_Nk = chosen_Nk / (chosen_Nk.sum(axis=-1, keepdims=True) + 1e-20)
    return ids_Nk, chosen_Nk * routed_scaling_factor


def expert_counts(ids_Nk: jax.Array, num_experts: int, token_mask_N: jax.Array | None = None) -> jax.Array:
    """Tokens routed to each expert [E] (float32), counting only tokens where token_mask is set."""
    one_hot_NkE = jax.nn.one_hot(ids_Nk, num_experts, dtype=jnp.float32)
    if token_mask_N is not None:
        one_hot_NkE = one_hot_NkE * token_mask_N.astype(jnp.float32)[:, None, None]
    return one_hot_NkE.sum(axis=(0, 1))
