"""Pure-JAX reference of Ling 2.0 grouped sigmoid top-k routing, forward and backward.

Axis letters: T tokens, E experts, G groups, S experts per group (E = G * S), K = top_k.

Forward (the official BailingMoeV2 gate):
  s = sigmoid(float32 logits); biased = s + expert_bias (bias steers selection only);
  group score = sum of the top-2 biased scores of each of G contiguous groups; the topk_group
  best groups are kept (others -inf); expert_ids = top-k of the kept biased scores (descending,
  ties to the lowest index, as lax.top_k); weights = s[expert_ids] / (sum + 1e-20) when K > 1
  (else s[expert_ids]), times routed_scaling_factor.
Backward (ids are constants): with D = sum_k s_k + 1e-20 and c the scaling factor,
  dL/ds_k = c / D * (g_k - sum_j g_j s_j / D)   (K > 1),   c * g_k   (K == 1);
  dL/dlogit_e = dL/ds_k * s_k (1 - s_k) at e = expert_ids[k], zero elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_router.config import GROUP_SCORE_TOP, NORM_EPS, RoutingParams


def normalize_and_scale(s_sel_TK: jax.Array, params: RoutingParams) -> jax.Array:
    """Routing weights from the unbiased scores of the chosen experts."""
    if params.top_k > 1:
        s_sel_TK = s_sel_TK / (jnp.sum(s_sel_TK, axis=-1, keepdims=True) + NORM_EPS)
    return s_sel_TK * jnp.float32(params.routed_scaling_factor)


def score_grad(s_sel_TK: jax.Array, dw_TK: jax.Array, params: RoutingParams) -> jax.Array:
    """dL/ds at the chosen experts given dL/dweights (see the module docstring)."""
    scale = jnp.float32(params.routed_scaling_factor)
    if params.top_k == 1:
        return scale * dw_TK
    denom_T1 = jnp.sum(s_sel_TK, axis=-1, keepdims=True) + NORM_EPS
    dot_T1 = jnp.sum(dw_TK * s_sel_TK, axis=-1, keepdims=True)
    return scale / denom_T1 * (dw_TK - dot_T1 / denom_T1)


def route_reference(logits_TE: jax.Array, bias_E: jax.Array, params: RoutingParams) -> tuple[jax.Array, jax.Array]:
    """Forward routing with lax.top_k. Returns (expert_ids [T, K] int32, weights [T, K] f32)."""
    num_tokens, num_experts = logits_TE.shape
    s_TE = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
    biased_TE = s_TE + bias_E.astype(jnp.float32)[None, :]
    biased_TGS = biased_TE.reshape(num_tokens, params.n_group, num_experts // params.n_group)
    group_scores_TG = jnp.sum(lax.top_k(biased_TGS, GROUP_SCORE_TOP)[0], axis=-1)
    _, kept_groups_TJ = lax.top_k(group_scores_TG, params.topk_group)
    group_keep_TG = (
        jnp.zeros_like(group_scores_TG, dtype=bool).at[jnp.arange(num_tokens)[:, None], kept_groups_TJ].set(True)
    )
    expert_keep_TE = jnp.repeat(group_keep_TG, num_experts // params.n_group, axis=1)
    masked_TE = jnp.where(expert_keep_TE, biased_TE, -jnp.inf)
    _, ids_TK = lax.top_k(masked_TE, params.top_k)
    s_sel_TK = jnp.take_along_axis(s_TE, ids_TK, axis=1)
    return ids_TK.astype(jnp.int32), normalize_and_scale(s_sel_TK, params)


def route_backward_reference(
    logits_TE: jax.Array, ids_TK: jax.Array, dw_TK: jax.Array, params: RoutingParams
) -> jax.Array:
    """dL/dlogits [T, E] (in the logits' dtype) from dL/dweights, ids held fixed."""
    s_TE = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
    s_sel_TK = jnp.take_along_axis(s_TE, ids_TK, axis=1)
    ds_sel_TK = score_grad(s_sel_TK, dw_TK.astype(jnp.float32), params)
    dlogit_sel_TK = ds_sel_TK * (s_sel_TK * (1.0 - s_sel_TK))
    rows_T1 = jnp.arange(logits_TE.shape[0])[:, None]
    dlogits_TE = jnp.zeros(logits_TE.shape, jnp.float32).at[rows_T1, ids_TK].add(dlogit_sel_TK)
    return dlogits_TE.astype(logits_TE.dtype)
