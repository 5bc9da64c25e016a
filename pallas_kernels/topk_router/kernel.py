"""Pallas TPU (Mosaic) kernels for grouped sigmoid top-k routing, forward and backward.

One grid step handles a [bt, E] tile of logits (tokens on sublanes, experts on lanes). lax.top_k
does not lower in Mosaic, so every top-k here is an unrolled max-and-mask loop: take the row
max, pick the LOWEST column holding it (min over an iota masked by `== max`, matching
lax.top_k's tie rule), record it, mask it to -inf, repeat. Groups are handled with column masks
(`col // S == g`) instead of a [bt, G, S] reshape, so no lane relayout is needed. All
"gathers" are iota-mask reductions, which are exact (one non-zero term).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.topk_router.config import TPU_SUBLANES, RouterKernelConfig, RoutingParams
from pallas_kernels.topk_router.reference import normalize_and_scale, score_grad


def resolve_interpret(config: RouterKernelConfig) -> bool:
    """Interpret on CPU, compile on TPU; other backends have no path (NotImplementedError)."""
    return common.resolve_interpret(config.interpret, "router")


def _argmax_first(values, cols, n_cols: int):
    """(row max [bt, 1], lowest column attaining it [bt, 1] int32)."""
    best = jnp.max(values, axis=1, keepdims=True)
    first = jnp.min(jnp.where(values == best, cols, n_cols), axis=1, keepdims=True)
    return best, first


def _take(values, cols, index):
    """values[row, index[row]] as [bt, 1] (index [bt, 1])."""
    return jnp.sum(jnp.where(cols == index, values, jnp.zeros_like(values)), axis=1, keepdims=True)


def _route_fwd_kernel(logits_ref, bias_ref, ids_ref, weights_ref, *, params: RoutingParams):
    s_te = jax.nn.sigmoid(logits_ref[...].astype(jnp.float32))
    biased_te = s_te + bias_ref[...].astype(jnp.float32)
    bt, num_experts = s_te.shape
    group_size = num_experts // params.n_group
    neg_inf = jnp.float32(-jnp.inf)
    col_te = lax.broadcasted_iota(jnp.int32, (bt, num_experts), 1)
    group_of_col_te = col_te // group_size

    # Group scores: sum of the top-2 biased scores within each contiguous group.
    col_tg = lax.broadcasted_iota(jnp.int32, (bt, params.n_group), 1)
    group_scores_tg = jnp.zeros((bt, params.n_group), jnp.float32)
    for g in range(params.n_group):
        in_group_te = jnp.where(group_of_col_te == g, biased_te, neg_inf)
        top1, first = _argmax_first(in_group_te, col_te, num_experts)
        top2 = jnp.max(jnp.where(col_te == first, neg_inf, in_group_te), axis=1, keepdims=True)
        group_scores_tg = jnp.where(col_tg == g, top1 + top2, group_scores_tg)

    # Keep the topk_group best groups (ties: lowest group index), expanded to experts.
    keep_te = jnp.zeros((bt, num_experts), jnp.bool_)
    for _ in range(params.topk_group):
        _, best_group = _argmax_first(group_scores_tg, col_tg, params.n_group)
        keep_te = jnp.logical_or(keep_te, group_of_col_te == best_group)
        group_scores_tg = jnp.where(col_tg == best_group, neg_inf, group_scores_tg)

    # Top-k experts over the kept biased scores, in descending order.
    masked_te = jnp.where(keep_te, biased_te, neg_inf)
    col_tk = lax.broadcasted_iota(jnp.int32, (bt, params.top_k), 1)
    ids_tk = jnp.zeros((bt, params.top_k), jnp.int32)
    s_sel_tk = jnp.zeros((bt, params.top_k), jnp.float32)
    for k in range(params.top_k):
        _, expert = _argmax_first(masked_te, col_te, num_experts)
        ids_tk = jnp.where(col_tk == k, expert, ids_tk)
        s_sel_tk = jnp.where(col_tk == k, _take(s_te, col_te, expert), s_sel_tk)
        masked_te = jnp.where(col_te == expert, neg_inf, masked_te)

    ids_ref[...] = ids_tk
    weights_ref[...] = normalize_and_scale(s_sel_tk, params)


def _route_bwd_kernel(logits_ref, ids_ref, dw_ref, dlogits_ref, *, params: RoutingParams):
    s_te = jax.nn.sigmoid(logits_ref[...].astype(jnp.float32))
    ids_tk = ids_ref[...]
    bt, num_experts = s_te.shape
    col_te = lax.broadcasted_iota(jnp.int32, (bt, num_experts), 1)
    col_tk = lax.broadcasted_iota(jnp.int32, (bt, params.top_k), 1)

    expert_ids = [_take(ids_tk, col_tk, k) for k in range(params.top_k)]
    s_sel_tk = jnp.zeros((bt, params.top_k), jnp.float32)
    for k, expert in enumerate(expert_ids):
        s_sel_tk = jnp.where(col_tk == k, _take(s_te, col_te, expert), s_sel_tk)
    ds_sel_tk = score_grad(s_sel_tk, dw_ref[...].astype(jnp.float32), params)
    dlogit_sel_tk = ds_sel_tk * (s_sel_tk * (1.0 - s_sel_tk))

    dlogits_te = jnp.zeros((bt, num_experts), jnp.float32)
    for k, expert in enumerate(expert_ids):
        dlogits_te = jnp.where(col_te == expert, _take(dlogit_sel_tk, col_tk, k), dlogits_te)
    dlogits_ref[...] = dlogits_te.astype(dlogits_ref.dtype)


def _token_tiling(num_tokens: int, config: RouterKernelConfig) -> tuple[int, int]:
    """(tokens per block, padded token count)."""
    bt = min(config.block_t, -(-num_tokens // TPU_SUBLANES) * TPU_SUBLANES)
    return bt, -(-num_tokens // bt) * bt


def _pad_rows(x, rows: int):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def pallas_route(logits_TE, bias_E, params: RoutingParams, config: RouterKernelConfig = RouterKernelConfig()):
    """Kernel forward: (expert_ids [T, k] int32, weights [T, k] float32)."""
    interpret = resolve_interpret(config)
    num_tokens, num_experts = logits_TE.shape
    bt, tp = _token_tiling(num_tokens, config)
    k = params.top_k
    ids, weights = pl.pallas_call(
        functools.partial(_route_fwd_kernel, params=params),
        grid=(tp // bt,),
        in_specs=[pl.BlockSpec((bt, num_experts), lambda t: (t, 0)), pl.BlockSpec((1, num_experts), lambda t: (0, 0))],
        out_specs=[pl.BlockSpec((bt, k), lambda t: (t, 0)), pl.BlockSpec((bt, k), lambda t: (t, 0))],
        out_shape=[jax.ShapeDtypeStruct((tp, k), jnp.int32), jax.ShapeDtypeStruct((tp, k), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="sigmoid_topk_route_fwd",
    )(_pad_rows(logits_TE, tp), bias_E.astype(jnp.float32).reshape(1, num_experts))
    return ids[:num_tokens], weights[:num_tokens]


def pallas_route_backward(
    logits_TE, ids_Tk, dw_Tk, params: RoutingParams, config: RouterKernelConfig = RouterKernelConfig()
):
    """Kernel backward: dL/dlogits [T, E] in the logits' dtype."""
    interpret = resolve_interpret(config)
    num_tokens, num_experts = logits_TE.shape
    bt, tp = _token_tiling(num_tokens, config)
    k = params.top_k
    dlogits = pl.pallas_call(
        functools.partial(_route_bwd_kernel, params=params),
        grid=(tp // bt,),
        in_specs=[
            pl.BlockSpec((bt, num_experts), lambda t: (t, 0)),
            pl.BlockSpec((bt, k), lambda t: (t, 0)),
            pl.BlockSpec((bt, k), lambda t: (t, 0)),
        ],
        out_specs=pl.BlockSpec((bt, num_experts), lambda t: (t, 0)),
        out_shape=jax.ShapeDtypeStruct((tp, num_experts), logits_TE.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="sigmoid_topk_route_bwd",
    )(_pad_rows(logits_TE, tp), _pad_rows(ids_Tk.astype(jnp.int32), tp), _pad_rows(dw_Tk.astype(jnp.float32), tp))
    return dlogits[:num_tokens]
