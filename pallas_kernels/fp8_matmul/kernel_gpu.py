"""Pallas GPU (Triton) kernel for the blockwise-scaled FP8 GEMM.

Grid (Mp/bm, Np/bn); each program owns one [bm, bn] output tile and walks the Kb quantization
blocks of the contraction in order, accumulating in float32 registers:

  acc[bm, bn] += dot(a_q[bm, 128], b_q[128, bn]) * (a_s[bm, 1] * b_s[1, bn])

The FP8 operands go to the tensor cores as FP8 (e4m3 x e4m3 -> f32, Hopper and later, compute
capability >= 8.9); the partial product of every 128-deep block is promoted to float32 and
rescaled before it is added, as in the recipe. b's scales are expanded to one per (k-block,
column), [Kb, N], before the call (block mode repeats each [128, 128] block's scale along its
128 columns), so block and tile mode share one kernel. The same order of operations as
`reference.scaled_matmul_reference`. Runs in interpret mode on CPU for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

import shard_typing
from pallas_kernels.fp8_matmul.config import QUANT_BLOCK, Fp8MatmulConfig
from pallas_kernels.fp8_matmul.quantize import round_up
from pallas_kernels.fp8_matmul.reference import b_scales_per_column, check_gemm_operands

# Triton's tensor-core dot needs every tile dim >= 16 (and a power of two).
GPU_MIN_TILE = 16


def _gemm_kernel(a_q_ref, a_s_ref, b_q_ref, b_s_ref, out_ref, *, k_blocks: int):
    def step(k, acc_mn):
        a_q_mq = a_q_ref[:, pl.ds(k * QUANT_BLOCK, QUANT_BLOCK)]
        b_q_qn = b_q_ref[pl.ds(k * QUANT_BLOCK, QUANT_BLOCK), :]
        part_mn = jnp.dot(a_q_mq, b_q_qn, preferred_element_type=jnp.float32)
        a_s_m1 = a_s_ref[:, pl.ds(k, 1)]
        b_s_1n = b_s_ref[pl.ds(k, 1), :]
        return acc_mn + part_mn * (a_s_m1 * b_s_1n)

    acc_mn = lax.fori_loop(0, k_blocks, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc_mn.astype(out_ref.dtype)


def _tile(requested: int, size: int) -> int:
    """The configured tile, shrunk to the problem (power of two, at least GPU_MIN_TILE)."""
    return min(requested, max(GPU_MIN_TILE, pl.next_power_of_2(size)))


def pallas_scaled_matmul_gpu(
    a_q_MKp,
    a_s_MKb,
    b_q_KpN,
    b_s,
    *,
    b_block_scales: bool,
    out_dtype=jnp.float32,
    config: Fp8MatmulConfig = Fp8MatmulConfig(),
) -> jax.Array:
    """Same contract as `reference.scaled_matmul_reference`, computed by the Triton kernel.

    Pads M and N to the tile (zero operands, unit scales) and slices the result back.
    `config.interpret` None or False compiles for the GPU; True runs the interpreter (tests).
    """
    check_gemm_operands(a_q_MKp, a_s_MKb, b_q_KpN, b_s, b_block_scales)
    m, kp = a_q_MKp.shape
    n = b_q_KpN.shape[1]
    kb = kp // QUANT_BLOCK
    bm = _tile(config.gpu_block_m, m)
    bn = _tile(config.gpu_block_n, n)
    mp, np_ = round_up(m, bm), round_up(n, bn)
    a_q = jnp.pad(a_q_MKp, ((0, mp - m), (0, 0)))
    a_s = jnp.pad(a_s_MKb.astype(jnp.float32), ((0, mp - m), (0, 0)), constant_values=1.0)
    b_q = jnp.pad(b_q_KpN, ((0, 0), (0, np_ - n)))
    b_s_KbN = b_scales_per_column(b_s.astype(jnp.float32), n, b_block_scales)
    b_s_KbNp = jnp.pad(b_s_KbN, ((0, 0), (0, np_ - n)), constant_values=1.0)

    out = pl.pallas_call(
        functools.partial(_gemm_kernel, k_blocks=kb),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, kb), lambda i, j: (i, 0)),
            pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
            pl.BlockSpec((kb, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=shard_typing.out_struct((mp, np_), out_dtype, a_q, b_q),
        compiler_params=pl_triton.CompilerParams(num_warps=config.gpu_num_warps, num_stages=config.gpu_num_stages),
        interpret=bool(config.interpret),
        name="blockwise_fp8_matmul_gpu",
    )(a_q, a_s, b_q, b_s_KbNp)
    return out[:m, :n]
