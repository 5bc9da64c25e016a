"""The blocked grouped-GEMM dispatch (dispatch_blocked.py) with routed experts in FP8.

Same layout, loop and cost structure as the high-precision path; every expert GEMM is a blockwise-
scaled E4M3 GEMM with float32 scales and accumulation (the recipe of pallas_kernels/fp8_matmul, forward
AND backward), so routed experts compute exactly what composing `blockwise_fp8_matmul` per expert
computes (x_e @ [gate_e | up_e], then h_e @ down_e; tests/test_dispatch_fp8.py), to float32 rounding:

  weights   quantized ONCE per call, outside the row-block loop: every expert's fused [D, 2F] gate|up
            and its [F, D] down in [128, 128] blocks (one [E, Dp, 2Fp] / [E, Fp, Dp] FP8 copy each,
            float32 block scales); the backward multiplies by the same blocks transposed.
  forward   x in [1, 128] tiles along D (quantized once, rows gathered per block), h = silu(g) * u in
            [1, 128] tiles along F per block.
  backward  per block, d_out = w * dy (the expert output's cotangent) in [1, 128] tiles along D for
            dh = d_out @ down^T; dgu in tiles along 2F for dx = dgu @ [gate | up]^T; the weight
            gradients contract over the expert's rows, so h, d_out, x and dgu are re-quantized in
            [128, 1] tiles along the rows (which is why the block size is a multiple of 128: an
            expert's group starts on a block boundary, so its 128-row tiles are those of the
            per-expert composition). The routing-weight gradient <out, dy> needs the FP8 expert
            output, which the backward recomputes (one extra [b, F] x [F, D] GEMM per block: five
            GEMMs instead of four) rather than storing an [R, D] buffer.

`impl` "xla" runs the scaled GEMMs in plain XLA (FP8 dot_general), "pallas" the FP8 matmul's Pallas
kernel (see ling_jax.ops.fp8.scaled_gemm).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ling_jax.ops.blocked_layout import BlockLayout, block_inputs, row_weights, silu_and_grad, take_rows, zeros_varying
from ling_jax.ops.fp8 import scaled_gemm
from pallas_kernels.fp8_matmul import QUANT_BLOCK, quantize_blocks, quantize_tiles
from shard_typing import reduce_to_varying, varying_axes

FP8_BLOCK_MULTIPLE = QUANT_BLOCK  # row blocks hold whole 128-row quantization tiles


class _Static(NamedTuple):
    """Hashable static arguments of the custom VJP."""

    block_size: int
    impl: str


class _QuantizedExperts(NamedTuple):
    """Every expert's weights in [128, 128] blocks: FP8 values and float32 block scales."""

    gate_up_q: jax.Array  # [E, Dp, 2Fp] float8_e4m3fn
    gate_up_s: jax.Array  # [E, Db, 2Fb] float32
    down_q: jax.Array  # [E, Fp, Dp]
    down_s: jax.Array  # [E, Fb, Db]


def fp8_block_size(auto_block: int, block_size: int | None) -> int:
    """The row-block size of the FP8 path: `block_size`, which must be a multiple of 128, or the
    automatic size rounded up to a multiple of 128."""
    if block_size is None:
        return -(-auto_block // FP8_BLOCK_MULTIPLE) * FP8_BLOCK_MULTIPLE
    if block_size <= 0 or block_size % FP8_BLOCK_MULTIPLE:
        raise ValueError(
            f"FP8 routed experts need block_size to be a positive multiple of {FP8_BLOCK_MULTIPLE} (weight-"
            f"gradient tiles are {FP8_BLOCK_MULTIPLE} rows of one expert), got {block_size}"
        )
    return block_size


def _quantize_experts(gate_EDF, up_EDF, down_EFD) -> _QuantizedExperts:
    gate_up_q, gate_up_s = jax.vmap(quantize_blocks)(jnp.concatenate([gate_EDF, up_EDF], axis=2))
    down_q, down_s = jax.vmap(quantize_blocks)(down_EFD)
    return _QuantizedExperts(gate_up_q, gate_up_s, down_q, down_s)


def _rows_t(a_bC):
    """a^T quantized in [1, 128] tiles along the rows of a (a's [128, 1] column tiles)."""
    return quantize_tiles(a_bC.T)


def _cols(a_bC):
    """(a's [128, 1] column tiles as the right operand of a tile-mode GEMM: q [bp, C], s [bpb, C])."""
    q_CBp, s_CBb = quantize_tiles(a_bC.T)
    return q_CBp.T, s_CBb.T


def _swiglu(gu_b2F):
    g_bF, u_bF = jnp.split(gu_b2F, 2, axis=1)
    return jax.nn.silu(g_bF) * u_bF


def _expert_out(gemm, h_bF, qw: _QuantizedExperts, e, D):
    """The FP8 expert output h @ down_e [b, D] (float32); h in [1, 128] tiles along F."""
    h_q, h_s = quantize_tiles(h_bF)
    return gemm(h_q, h_s, qw.down_q[e], qw.down_s[e], b_block_scales=True, out_dtype=jnp.float32)[:, :D]


def _fwd_scan(x_ND, row_weight_R, qw: _QuantizedExperts, layout: BlockLayout, static: _Static, F: int):
    """y [N, D] float32 and the saved pre-activations [g | u] of every row [R, 2F] (x's dtype)."""
    gemm, b, D = scaled_gemm(static.impl), static.block_size, x_ND.shape[1]
    x_q, x_s = quantize_tiles(x_ND)  # per row: the same tiles whichever block a row lands in
    vma = varying_axes(x_ND, row_weight_R, *qw, layout.row_token_R)

    def block(y_ND, inp):
        q, e, token_b, weight_b = inp

        def compute(y_ND):
            gu_b2F = gemm(
                take_rows(x_q, token_b),
                take_rows(x_s, token_b),
                qw.gate_up_q[e],
                qw.gate_up_s[e],
                b_block_scales=True,
                out_dtype=jnp.float32,
            )[:, : 2 * F].astype(x_ND.dtype)
            out_bD = _expert_out(gemm, _swiglu(gu_b2F), qw, e, D).astype(x_ND.dtype)
            y_ND = y_ND.at[token_b].add((out_bD * weight_b[:, None]).astype(y_ND.dtype), mode="drop")
            return y_ND, gu_b2F

        def skip(y_ND):
            return y_ND, zeros_varying((b, 2 * F), x_ND.dtype, vma)

        return lax.cond(q < layout.num_used_blocks, compute, skip, y_ND)

    y_ND, gu_Qb2F = lax.scan(block, zeros_varying(x_ND.shape, jnp.float32, vma), block_inputs(layout, b, row_weight_R))
    return y_ND, gu_Qb2F.reshape(-1, 2 * F)


def _bwd_scan(x_ND, dy_ND, row_weight_R, qw: _QuantizedExperts, layout: BlockLayout, static: _Static, gu_R2F):
    """dx [N, D], per-row routing-weight gradients [R], d gate|up [E, D, 2F], d down [E, F, D] (float32)."""
    gemm, b = scaled_gemm(static.impl), static.block_size
    (N, D), F = x_ND.shape, gu_R2F.shape[1] // 2
    E = qw.down_q.shape[0]
    f32 = jnp.float32
    vma = varying_axes(x_ND, dy_ND, row_weight_R, *qw, layout.row_token_R, gu_R2F)

    def block(carry, inp):
        q, e, token_b, weight_b, gu_b2F = inp

        def compute(carry):
            dx_ND, dgate_up_ED2F, ddown_EFD = carry
            x_bD = take_rows(x_ND, token_b).astype(f32)
            dy_bD = take_rows(dy_ND, token_b).astype(f32)
            h_bF = _swiglu(gu_b2F)  # x's dtype, exactly as the forward computed it
            out_bD = _expert_out(gemm, h_bF, qw, e, D).astype(x_ND.dtype).astype(f32)
            h_bF = h_bF.astype(f32)
            g_bF, u_bF = jnp.split(gu_b2F.astype(f32), 2, axis=1)
            a_bF, dsilu_bF = silu_and_grad(g_bF)
            dweight_b = jnp.sum(out_bD * dy_bD, axis=1)
            dout_bD = dy_bD * weight_b.astype(f32)[:, None]
            dout_q, dout_s = quantize_tiles(dout_bD)
            dh_bF = gemm(dout_q, dout_s, qw.down_q[e].T, qw.down_s[e].T, b_block_scales=True, out_dtype=f32)[:, :F]
            ddown_EFD = ddown_EFD.at[e].add(gemm(*_rows_t(h_bF), *_cols(dout_bD), b_block_scales=False, out_dtype=f32))
            dgu_b2F = jnp.concatenate([dh_bF * u_bF * dsilu_bF, dh_bF * a_bF], axis=1)
            dgate_up_ED2F = dgate_up_ED2F.at[e].add(
                gemm(*_rows_t(x_bD), *_cols(dgu_b2F), b_block_scales=False, out_dtype=f32)
            )
            dgu_q, dgu_s = quantize_tiles(dgu_b2F)
            dx_bD = gemm(dgu_q, dgu_s, qw.gate_up_q[e].T, qw.gate_up_s[e].T, b_block_scales=True, out_dtype=f32)[:, :D]
            dx_ND = dx_ND.at[token_b].add(dx_bD, mode="drop")
            return (dx_ND, dgate_up_ED2F, ddown_EFD), dweight_b

        def skip(carry):
            return carry, zeros_varying((b,), f32, vma)

        return lax.cond(q < layout.num_used_blocks, compute, skip, carry)

    carry0 = tuple(zeros_varying(shape, f32, vma) for shape in ((N, D), (E, D, 2 * F), (E, F, D)))
    (dx_ND, dgate_up_ED2F, ddown_EFD), dweight_Qb = lax.scan(
        block, carry0, block_inputs(layout, b, row_weight_R, gu_R2F)
    )
    return dx_ND, dweight_Qb.reshape(-1), dgate_up_ED2F, ddown_EFD


def blocked_moe_fp8(
    x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout: BlockLayout, *, block_size: int, impl: str
) -> jax.Array:
    """y [N, D] in x's dtype: the blocked routed experts (`layout` built with `block_size`, a multiple of
    128) with every GEMM in blockwise FP8, `impl` "xla" or "pallas"."""
    if block_size % FP8_BLOCK_MULTIPLE:
        raise ValueError(f"block_size must be a multiple of {FP8_BLOCK_MULTIPLE}, got {block_size}")
    return _blocked_moe_fp8(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout, _Static(block_size, impl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocked_moe_fp8(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout: BlockLayout, static: _Static):
    return _fwd(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout, static)[0]


def _fwd(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout, static: _Static):
    qw = _quantize_experts(gate_EDF, up_EDF, down_EFD)
    row_weight_R = row_weights(weights_Nk, layout, x_ND.dtype)
    y_ND, gu_R2F = _fwd_scan(x_ND, row_weight_R, qw, layout, static, gate_EDF.shape[2])
    # gate / up / down are kept only for their dtypes and varying mesh axes (they are live params anyway).
    return y_ND.astype(x_ND.dtype), (x_ND, weights_Nk, (gate_EDF, up_EDF, down_EFD), qw, layout, gu_R2F)


def _bwd(static: _Static, residuals, dy_ND):
    x_ND, weights_Nk, (gate_EDF, up_EDF, down_EFD), qw, layout, gu_R2F = residuals
    N, k = weights_Nk.shape
    F = gate_EDF.shape[2]
    row_weight_R = row_weights(weights_Nk, layout, x_ND.dtype)
    dx_ND, dweight_R, dgate_up_ED2F, ddown_EFD = _bwd_scan(
        x_ND, dy_ND.astype(x_ND.dtype), row_weight_R, qw, layout, static, gu_R2F
    )
    dweights_Nk = take_rows(dweight_R, layout.pos_M).reshape(N, k)
    cts = (
        dx_ND.astype(x_ND.dtype),
        dweights_Nk.astype(weights_Nk.dtype),
        dgate_up_ED2F[:, :, :F].astype(gate_EDF.dtype),
        dgate_up_ED2F[:, :, F:].astype(up_EDF.dtype),
        ddown_EFD.astype(down_EFD.dtype),
    )
    primals = (x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD)
    return (*(reduce_to_varying(ct, p) for ct, p in zip(cts, primals)), None)


_blocked_moe_fp8.defvjp(_fwd, _bwd)
