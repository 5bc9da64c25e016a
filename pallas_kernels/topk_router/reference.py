"""Pure-JAX reference of Ling 2.0 grouped sigmoid top-k routing, forward and backward.

Axis letters: T tokens, E experts, G groups, S experts per group (E = G * S), k experts per token
(top_k), as in the glossary of ling_jax/layers/__init__.py.

Forward (the official BailingMoeV2 gate):
  s = sigmoid(float32 logits); biased = s + expert_bias (bias steers selection only);
  group score = sum of the top-2 biased scores of each of G contiguous groups; the topk_group
  best groups are kept (others -inf); expert_ids = top-k of the kept biased scores (descending,
  ties to the lowest index, as lax.top_k); weights = s[expert_ids] / (sum + 1e-20) when k > 1
  (else s[expert_ids]), times routed_scaling_factor.
Backward (ids are constants): with D = sum_k s_k + 1e-20 and c the scaling factor,
  dL/ds_k = c / D * (g_k - sum_j g_j s_j / D)   (k > 1),   c * g_k   (k == 1);
  dL/dlogit_e = dL/ds_k * s_k (1 - s_k) at e = expert_ids[k], zero elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_router.config import GROUP_SCORE_TOP, NORM_EPS, RoutingParams


def normalize_and_scale(s_sel_Tk: jax.Array, params: RoutingParams) -> jax.Array:
    """Routing weights from the unbiased scores of the chosen experts."""
    if params.top_k > 1:
        s_sel_Tk = s_sel_Tk / (jnp.sum(s_sel_Tk, axis=-1, keepdims=True) + NORM_EPS)
    return s_sel_Tk * jnp.float32(params.routed_scaling_factor)


def score_grad(s_sel_Tk: jax.Array, dw_Tk: jax.Array, params: RoutingParams) -> jax.Array:
    """dL/ds at the chosen experts given dL/dweights (see the module docstring)."""
    scale = jnp.float32(params.routed_scaling_factor)
    if params.top_k == 1:
        return scale * dw_Tk
    denom_T1 = jnp.sum(s_sel_Tk, axis=-1, keepdims=True) + NORM_EPS
    dot_T1 = jnp.sum(dw_Tk * s_sel_Tk, axis=-1, keepdims=True)
    return scale / denom_T1 * (dw_Tk - dot_T1 / denom_T1)


def route_reference(logits_TE: jax.Array, bias_E: jax.Array, params: RoutingParams) -> tuple[jax.Array, jax.Array]:
    """Forward routing with lax.top_k. Returns (expert_ids [T, k] int32, weights [T, k] f32)."""
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
    _, ids_Tk = lax.top_k(masked_TE, params.top_k)
    s_sel_Tk = jnp.take_along_axis(s_TE, ids_Tk, axis=1)
    return ids_Tk.astype(jnp.int32), normalize_and_scale(s_sel_Tk, params)


def route_backward_reference(
    logits_TE: jax.Array, ids_Tk: jax.Array, dw_Tk: jax.Array, params: RoutingParams
) -> jax.Array:
    """dL/dlogits [T, E] (in the logits' dtype) from dL/dweights, ids held fixed."""
    s_TE = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
    s_sel_Tk = jnp.take_along_axis(s_TE, ids_Tk, axis=1)
    ds_sel_Tk = score_grad(s_sel_Tk, dw_Tk.astype(jnp.float32), params)
    dlogit_sel_Tk = ds_sel_Tk * (s_sel_Tk * (1.0 - s_sel_Tk))
    rows_T1 = jnp.arange(logits_TE.shape[0])[:, None]
    dlogits_TE = jnp.zeros(logits_TE.shape, jnp.float32).at[rows_T1, ids_Tk].add(dlogit_sel_Tk)
    return dlogits_TE.astype(logits_TE.dtype)
