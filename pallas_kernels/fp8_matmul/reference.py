"""Pure-JAX reference of the blockwise FP8 matmul: the scaled GEMM, the forward and backward.

Axis letters: M rows of x, K contraction, N columns of w; Q = 128 (quantization block);
Kp = K padded to Q, Kb = Kp / Q (likewise Mp/Mb, Np/Nb).

Scaled GEMM. `a` is quantized in [1, Q] tiles along the contraction (one scale per row per
k-block, `a_s_MKb`); `b` either in [Q, Q] blocks (`b_s_KbNb`, block mode) or in [Q, 1] tiles
(one scale per column per k-block, `b_s_KbN`, tile mode). Per k-block the FP8 operands are
multiplied with float32 accumulation and the partial product is rescaled by a_s * b_s, then
summed over k-blocks in order:  out = sum_kb dot(a_q[:, kb], b_q[kb, :]) * (a_s[:, kb] b_s[kb]).

Forward:  y = x @ w with x in [1, 128] tiles along K and w in [128, 128] blocks.
Backward (all E4M3, float32 scales and accumulation):
  dx = dy @ w^T: dy re-quantized in [1, 128] tiles along N; w^T reuses the forward's FP8
       blocks transposed, with the [Kb, Nb] block-scale table transposed (no re-quantization).
  dw = x^T @ dy: contraction over M, so both operands are re-quantized along M: x^T in [1, 128]
       tiles along M (x in [128, 1] column tiles) and dy in [128, 1] column tiles along M (dy^T
       in [1, 128] tiles). The x re-quantization reads the saved high-precision x.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_matmul.config import QUANT_BLOCK
from pallas_kernels.fp8_matmul.quantize import quantize_blocks, quantize_tiles
from shard_typing import varying_axes


class ScaledGemm(Protocol):
    def __call__(
        self,
        a_q_MKp: jax.Array,
        a_s_MKb: jax.Array,
        b_q_KpN: jax.Array,
        b_s: jax.Array,
        *,
        b_block_scales: bool,
        out_dtype,
    ) -> jax.Array: ...


def b_scales_per_column(b_s: jax.Array, n_cols: int, b_block_scales: bool) -> jax.Array:
    """Expands b's scales to one float32 scale per (k-block, column): [Kb, N]."""
    if b_block_scales:
        return jnp.repeat(b_s, QUANT_BLOCK, axis=1)[:, :n_cols]
    return b_s


def check_gemm_operands(a_q_MKp, a_s_MKb, b_q_KpN, b_s, b_block_scales: bool) -> None:
    """Raises ValueError when the quantized operands and scale tables disagree in shape."""
    m, kp = a_q_MKp.shape
    kp_b, n = b_q_KpN.shape
    kb = kp // QUANT_BLOCK
    if kp % QUANT_BLOCK or kp_b != kp:
        raise ValueError(
            f"contraction dims must match and be multiples of {QUANT_BLOCK}: a {a_q_MKp.shape}, b {b_q_KpN.shape}"
        )
    if a_s_MKb.shape != (m, kb):
        raise ValueError(f"a scales must be {(m, kb)}, got {a_s_MKb.shape}")
    if b_block_scales:
        if n % QUANT_BLOCK or b_s.shape != (kb, n // QUANT_BLOCK):
            raise ValueError(
                f"block-mode b needs N % {QUANT_BLOCK} == 0 and scales "
                f"{(kb, n // QUANT_BLOCK)}; got b {b_q_KpN.shape}, scales {b_s.shape}"
            )
    elif b_s.shape != (kb, n):
        raise ValueError(f"tile-mode b scales must be {(kb, n)}, got {b_s.shape}")


def scaled_matmul_reference(
    a_q_MKp, a_s_MKb, b_q_KpN, b_s, *, b_block_scales: bool, out_dtype=jnp.float32
) -> jax.Array:
    """Blockwise-scaled FP8 GEMM in plain XLA (FP8 dot_general, float32 accumulation)."""
    check_gemm_operands(a_q_MKp, a_s_MKb, b_q_KpN, b_s, b_block_scales)
    m, kp = a_q_MKp.shape
    n = b_q_KpN.shape[1]
    kb = kp // QUANT_BLOCK
    a_q_KbMQ = a_q_MKp.reshape(m, kb, QUANT_BLOCK).transpose(1, 0, 2)
    b_q_KbQN = b_q_KpN.reshape(kb, QUANT_BLOCK, n)
    a_s_KbM = a_s_MKb.T
    b_s_KbN = b_scales_per_column(b_s, n, b_block_scales)

    def step(acc_MN, operands):
        a_MQ, b_QN, a_s_M, b_s_N = operands
        part_MN = lax.dot_general(a_MQ, b_QN, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc_MN + part_MN * (a_s_M[:, None] * b_s_N[None, :]), None

    init_MN = jnp.zeros((m, n), jnp.float32)
    vma = varying_axes(a_q_MKp, a_s_MKb, b_q_KpN, b_s)
    if vma:  # inside jax.shard_map the carry varies along the operands' mesh axes
        init_MN = lax.pcast(init_MN, tuple(sorted(vma)), to="varying")
    acc_MN, _ = lax.scan(step, init_MN, (a_q_KbMQ, b_q_KbQN, a_s_KbM, b_s_KbN))
    return acc_MN.astype(out_dtype)


def fp8_matmul_forward(x_MK: jax.Array, w_KN: jax.Array, out_dtype, gemm: ScaledGemm = scaled_matmul_reference):
    """Forward pass. Returns (y_MN in out_dtype, residuals for `fp8_matmul_backward`)."""
    n = w_KN.shape[1]
    x_q_MKp, x_s_MKb = quantize_tiles(x_MK)
    w_q_KpNp, w_s_KbNb = quantize_blocks(w_KN)
    y_MNp = gemm(x_q_MKp, x_s_MKb, w_q_KpNp, w_s_KbNb, b_block_scales=True, out_dtype=out_dtype)
    return y_MNp[:, :n], (x_MK, w_q_KpNp, w_s_KbNb, jnp.zeros((0,), w_KN.dtype))


def fp8_matmul_backward(residuals, dy_MN: jax.Array, gemm: ScaledGemm = scaled_matmul_reference):
    """Backward pass in FP8 (see the module docstring). Returns (dx_MK, dw_KN)."""
    x_MK, w_q_KpNp, w_s_KbNb, w_dtype_marker = residuals
    k = x_MK.shape[1]
    n = dy_MN.shape[1]
    dy_MN = dy_MN.astype(jnp.float32)

    dy_q_MNp, dy_s_MNb = quantize_tiles(dy_MN)
    dx_MKp = gemm(dy_q_MNp, dy_s_MNb, w_q_KpNp.T, w_s_KbNb.T, b_block_scales=True, out_dtype=jnp.float32)

    x_t_q_KMp, x_t_s_KMb = quantize_tiles(x_MK.T)
    dy_t_q_NMp, dy_t_s_NMb = quantize_tiles(dy_MN.T)
    dw_KN = gemm(x_t_q_KMp, x_t_s_KMb, dy_t_q_NMp.T, dy_t_s_NMb.T, b_block_scales=False, out_dtype=jnp.float32)
    return dx_MKp[:, :k].astype(x_MK.dtype), dw_KN[:, :n].astype(w_dtype_marker.dtype)
