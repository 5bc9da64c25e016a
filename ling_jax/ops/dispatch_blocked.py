"""Blocked grouped-GEMM dispatch ("blocked"): the dropless MoE path that is fast where `ragged_dot` is not.

The pure-JAX CPU path where the compiled kernel (cpu_kernels/, "cpu_kernel") is not built, and the FP8
path everywhere. The row layout (every expert's rows padded to whole blocks of b rows, a static bound on
the block count) is ling_jax/ops/blocked_layout.py; the routed computation is a grouped GEMM over those
fixed-size row blocks, a `lax.scan` that indexes each block's expert weights, with a hand-written VJP.

Cost model (f = 6 * D * F, the FLOPs of one SwiGLU expert on one row):
  forward   M * f useful + padding rows (on average b / 2 per non-empty expert, at most b - 1);
            blocks past the used ones are skipped at run time (`lax.cond`), so the static bound
            costs memory, not FLOPs. gate and up run as one [b, D] x [D, 2F] matmul per block;
  backward  2x the forward FLOPs (dx and dW), from the pre-activations [g | u] saved by the forward
            ([R, 2F] rows, kept as the loop stacked them, the only row buffer); the routing-weight
            gradient <out, dy> = <h, dy down^T> reuses a matmul the backward needs anyway, so
            expert outputs are never stored;
  moves     per block, x / dy rows are gathered from token order and results are scatter-added back
            into a float32 [N, D] loop carry (in place); expert weights are read by dynamic index (no
            gathered [Q, D, F] copies); dW accumulates in place in a float32 [E, D, 2F] / [E, F, D]
            carry. No [M, D]-sized buffer is materialised.
  steps     blocks smaller than STEP_ROWS rows go P = STEP_ROWS // b to a loop step, as one batched
            matmul with the P blocks' weights gathered ([P, D, 2F], a small copy).

XLA:CPU pitfall this code is shaped around: a `lax.switch`, or nested `lax.cond`s, that thread the
loop carries through their branches copy those carries (the [E, D, F] gradients) on every step; only a
two-way `lax.cond` updates them in place. Measurements, and the alternatives tried and not kept, are in
benchmarks/README.md ("The blocked dispatch").

FP8: with `fp8_impl` set, dispatch_blocked_fp8.py runs the same layout and loop with every expert GEMM
(forward and backward) in blockwise FP8, weights quantized once per call.

Ids outside [0, E) mean "no assignment" (contributes nothing and costs no rows): expert parallelism
uses this for the slots of tokens routed to other shards. Second-order derivatives are not supported
(custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ling_jax.ops import dispatch_blocked_fp8
from ling_jax.ops.blocked_layout import (
    BlockLayout,
    auto_block_size,
    block_inputs,
    blocked_layout,
    row_weights,
    silu_and_grad,
    take_rows,
    zeros_varying,
)
from ling_jax.ops.fp8 import check_fp8_impl
from shard_typing import reduce_to_varying, varying_axes

# Rows per loop step: small blocks are grouped P = max(1, STEP_ROWS // b) to a step and multiplied as one
# batched matmul with their gathered [P, D, 2F] weights (fewer loop steps; XLA:CPU spreads the batched
# matmul over both cores). The value is measured (benchmarks/README.md).
STEP_ROWS = 256


def blocks_per_step(block_size: int) -> int:
    return max(1, STEP_ROWS // block_size)


def _step_inputs(layout: BlockLayout, block_size: int, num_tokens: int, row_weight_R, *per_row):
    """Scan inputs, P = blocks_per_step(b) blocks a step: block indices [S, P], experts [S, P], the rows'
    tokens [S, P, b] and weights [S, P, b], then `per_row` arrays [S, P, b, ...]. The Q blocks are padded
    to S * P with empty blocks (index >= Q: past the used ones; tokens N: read as zeros, dropped on write;
    weight 0) of the last block's expert."""
    P = blocks_per_step(block_size)
    _, e_Q, token_Qb, *rest_Qb = block_inputs(layout, block_size, row_weight_R, *per_row)
    Q = e_Q.shape[0]
    pad = -Q % P

    def steps(a, **pad_mode):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), **pad_mode)
        return a.reshape(a.shape[0] // P, P, *a.shape[1:])

    return (
        jnp.arange(Q + pad, dtype=jnp.int32).reshape(-1, P),
        steps(e_Q, mode="edge"),
        steps(token_Qb, constant_values=num_tokens),
        *(steps(a) for a in rest_Qb),
    )


def _blocked_swiglu_fwd(x_ND, row_weight_R, fused, layout: BlockLayout, block_size: int):
    """y [N, D] (float32) = sum over rows r of weight_r * expert(x[token_r]), scatter-added per step,
    and the saved pre-activations [g | u] of every row, as the loop stacked them: [S, P, b, 2F] (kept
    in that shape for the backward's loop: no slicing and re-padding copies)."""
    gate_up_ED2F, down_EFD = fused
    P, b, F2 = blocks_per_step(block_size), block_size, gate_up_ED2F.shape[2]
    N, D = x_ND.shape
    vma = varying_axes(x_ND, row_weight_R, gate_up_ED2F, down_EFD, layout.row_token_R)

    def step(y_ND, inp):
        q_P, e_P, token_Pb, weight_Pb = inp

        def compute(y_ND):
            tokens = token_Pb.reshape(P * b)
            x_PbD = take_rows(x_ND, tokens).reshape(P, b, D)
            gu_Pb2F = jnp.einsum("PbD,PDF->PbF", x_PbD, gate_up_ED2F[e_P])
            g_PbF, u_PbF = jnp.split(gu_Pb2F, 2, axis=-1)
            out_PbD = jnp.einsum("PbF,PFD->PbD", jax.nn.silu(g_PbF) * u_PbF, down_EFD[e_P])
            contrib = (out_PbD * weight_Pb[..., None]).reshape(P * b, D).astype(y_ND.dtype)
            return y_ND.at[tokens].add(contrib, mode="drop"), gu_Pb2F

        def skip(y_ND):
            return y_ND, zeros_varying((P, b, F2), x_ND.dtype, vma)

        return lax.cond(q_P[0] < layout.num_used_blocks, compute, skip, y_ND)

    return lax.scan(step, zeros_varying(x_ND.shape, jnp.float32, vma), _step_inputs(layout, b, N, row_weight_R))


def _blocked_swiglu_bwd(x_ND, dy_ND, row_weight_R, fused, layout: BlockLayout, block_size: int, gu_SPb2F):
    """Gradients of <y, dy>: dx [N, D], per-row routing-weight gradients [R], d gate, d up, d down, all
    accumulated in float32.

    Per block, dyW = dy @ down^T serves both the routing-weight gradient <out, dy> = <h, dyW> and
    dh = w * dyW, so the forward's expert outputs need not be kept. The weight gradients of a step's
    blocks are scatter-added by expert (two blocks of one expert add up).
    """
    gate_up_ED2F, down_EFD = fused
    P, b, F = blocks_per_step(block_size), block_size, down_EFD.shape[1]
    N, D = x_ND.shape
    R = layout.row_token_R.shape[0]
    f32 = jnp.float32
    vma = varying_axes(x_ND, dy_ND, row_weight_R, gate_up_ED2F, down_EFD, layout.row_token_R, gu_SPb2F)

    def step(carry, inp):
        q_P, e_P, token_Pb, weight_Pb, gu_Pb2F = inp

        def compute(carry):
            dx_ND, dgate_EDF, dup_EDF, ddown_EFD = carry
            tokens = token_Pb.reshape(P * b)
            x_PbD = take_rows(x_ND, tokens).reshape(P, b, D)
            dy_PbD = take_rows(dy_ND, tokens).reshape(P, b, D)
            g_PbF, u_PbF = jnp.split(gu_Pb2F, 2, axis=-1)
            a_PbF, dsilu_PbF = silu_and_grad(g_PbF)
            h_PbF = a_PbF * u_PbF
            dyW_PbF = jnp.einsum("PbD,PFD->PbF", dy_PbD, down_EFD[e_P])
            dweight_Pb = jnp.sum((h_PbF * dyW_PbF).astype(f32), axis=-1)
            ddown_EFD = ddown_EFD.at[e_P].add(
                jnp.einsum("PbF,PbD->PFD", h_PbF * weight_Pb[..., None], dy_PbD, preferred_element_type=f32)
            )
            dh_PbF = dyW_PbF * weight_Pb[..., None]
            dgu_Pb2F = jnp.concatenate([dh_PbF * u_PbF * dsilu_PbF, dh_PbF * a_PbF], axis=-1)
            dgate_up_PD2F = jnp.einsum("PbD,PbF->PDF", x_PbD, dgu_Pb2F, preferred_element_type=f32)
            dgate_EDF = dgate_EDF.at[e_P].add(dgate_up_PD2F[..., :F])  # separate carries: no split copy
            dup_EDF = dup_EDF.at[e_P].add(dgate_up_PD2F[..., F:])
            dx_PbD = jnp.einsum("PbF,PDF->PbD", dgu_Pb2F, gate_up_ED2F[e_P])
            dx_ND = dx_ND.at[tokens].add(dx_PbD.reshape(P * b, D).astype(f32), mode="drop")
            return (dx_ND, dgate_EDF, dup_EDF, ddown_EFD), dweight_Pb

        def skip(carry):
            return carry, zeros_varying((P, b), f32, vma)

        return lax.cond(q_P[0] < layout.num_used_blocks, compute, skip, carry)

    E = down_EFD.shape[0]
    carry0 = tuple(zeros_varying(shape, f32, vma) for shape in (x_ND.shape, (E, D, F), (E, D, F), (E, F, D)))
    (dx_ND, dgate_EDF, dup_EDF, ddown_EFD), dweight_SPb = lax.scan(
        step, carry0, (*_step_inputs(layout, b, N, row_weight_R), gu_SPb2F)
    )
    return dx_ND, dweight_SPb.reshape(-1)[:R], dgate_EDF, dup_EDF, ddown_EFD


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocked_moe(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout: BlockLayout, block_size: int):
    return _blocked_moe_fwd(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout, block_size)[0]


def _blocked_moe_fwd(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout, block_size):
    # gate and up side by side: one [b, D] x [D, 2F] matmul per block instead of two narrower ones.
    fused = (jnp.concatenate([gate_EDF, up_EDF], axis=2), down_EFD)
    row_weight_R = row_weights(weights_Nk, layout, x_ND.dtype)
    y_ND, gu_SPb2F = _blocked_swiglu_fwd(x_ND, row_weight_R, fused, layout, block_size)
    return y_ND.astype(x_ND.dtype), (x_ND, weights_Nk, fused, layout, gu_SPb2F)


def _blocked_moe_bwd(block_size, residuals, dy_ND):
    x_ND, weights_Nk, fused, layout, gu_SPb2F = residuals
    N, k = weights_Nk.shape
    row_weight_R = row_weights(weights_Nk, layout, x_ND.dtype)
    dx_ND, dweight_R, dgate_EDF, dup_EDF, ddown_EFD = _blocked_swiglu_bwd(
        x_ND, dy_ND.astype(x_ND.dtype), row_weight_R, fused, layout, block_size, gu_SPb2F
    )
    dweights_Nk = take_rows(dweight_R, layout.pos_M).reshape(N, k)
    wdtype = fused[1].dtype
    cts = (
        dx_ND.astype(x_ND.dtype),
        dweights_Nk.astype(weights_Nk.dtype),
        dgate_EDF.astype(wdtype),
        dup_EDF.astype(wdtype),
        ddown_EFD.astype(wdtype),
    )
    # gate and up share their vma with the fused array they were concatenated into.
    primals = (x_ND, weights_Nk, fused[0], fused[0], fused[1])
    return (*(reduce_to_varying(ct, p) for ct, p in zip(cts, primals)), None)


_blocked_moe.defvjp(_blocked_moe_fwd, _blocked_moe_bwd)


def dispatch_blocked(
    x_ND, ids_Nk, weights_Nk, experts, *, block_size: int | None = None, fp8_impl: str | None = None
) -> jax.Array:
    """y[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]) as a grouped GEMM over row blocks.

    `experts` is an ExpertWeights (gate [E, D, F], up [E, D, F], down [E, F, D]). `block_size` None picks
    `auto_block_size`. Exact (equal to "dense" to float tolerance), dropless, differentiable in x,
    weights and expert weights.

    `fp8_impl` "xla" or "pallas" (None: high precision; `ling_jax.ops.fp8.fp8_impl` converts a config's
    `fp8` mode) runs every expert
    GEMM, forward and backward, in blockwise FP8 (ling_jax/ops/dispatch_blocked_fp8.py); the block
    size is then a multiple of 128 (None: `auto_block_size` rounded up).
    """
    N, k = ids_Nk.shape
    E = experts[0].shape[0]
    fp8 = check_fp8_impl(fp8_impl)
    if fp8 is not None:
        b = dispatch_blocked_fp8.fp8_block_size(auto_block_size(N * k, E), block_size)
    else:
        b = auto_block_size(N * k, E) if block_size is None else int(block_size)
    if b <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    dtype = jnp.result_type(x_ND, *experts)  # one compute dtype (a no-op when they already agree)
    layout = blocked_layout(ids_Nk, E, b)
    # jnp.asarray: numpy weights (e.g. from hf.load_checkpoint) must become jax arrays, since the block
    # loop indexes them with a traced expert id.
    args = (jnp.asarray(x_ND, dtype), jnp.asarray(weights_Nk), *(jnp.asarray(w, dtype) for w in experts), layout)
    if fp8 is not None:
        return dispatch_blocked_fp8.blocked_moe_fp8(*args, block_size=b, impl=fp8)
    return _blocked_moe(*args, b)
