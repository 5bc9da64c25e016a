"""Pallas TPU (Mosaic) kernel for the blockwise-scaled FP8 GEMM.

Grid (M/bm, N/bn, K/128); the contraction axis is last and sequential ("arbitrary"), one
k-step per 128-wide quantization block, accumulating into a float32 VMEM scratch tile:

  acc[bm, bn] += dot(a_q[bm, 128], b_q[128, bn]) * (a_s[bm, 1] * b_s)

* `a_s` (per-row tile scales) is a VMEM block [bm, Kb]; the column of step k is picked with an
  iota mask and a lane reduction (a [bm, 1] VMEM block would break the (8, 128) tiling rule).
* block mode: b's [Kb, Nb] block-scale table lives whole in SMEM (flattened); the bn / 128
  scalars of step (k, j) are read and spread over a [1, bn] row.
* tile mode (weight gradient): b's per-column scales are a VMEM block [Kb, bn], row k picked
  with an iota mask and a sublane reduction.
The same order of operations as `reference.scaled_matmul_reference`, so the two agree to
float32 rounding of the in-block dot. On CPU the kernel runs with interpret=True.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import shard_typing
from pallas_kernels import common
from pallas_kernels.fp8_matmul.config import (
    QUANT_BLOCK,
    TPU_FP8_SUBLANES,
    TPU_LANES,
    TPU_SMEM_SCALE_TABLE_MAX_BYTES,
    TPU_VMEM_SCALE_BLOCKS_MAX_BYTES,
    Fp8MatmulConfig,
)
from pallas_kernels.fp8_matmul.quantize import round_up
from pallas_kernels.fp8_matmul.reference import check_gemm_operands


def resolve_interpret(config: Fp8MatmulConfig) -> bool:
    """Interpret on CPU, compile on TPU; other backends have no path (NotImplementedError)."""
    return common.resolve_interpret(config.interpret, "FP8 matmul")


def check_supported(k_blocks: int, n_cols: int, b_block_scales: bool, bm: int, bn: int) -> None:
    """Raises NotImplementedError for problems the kernel does not handle."""
    scale_block_bytes = 2 * 4 * k_blocks * (bm + (0 if b_block_scales else bn))
    if scale_block_bytes > TPU_VMEM_SCALE_BLOCKS_MAX_BYTES:
        raise NotImplementedError(
            f"scale blocks of {scale_block_bytes} bytes exceed the VMEM "
            f"budget of {TPU_VMEM_SCALE_BLOCKS_MAX_BYTES} bytes"
        )
    if b_block_scales:
        table_bytes = 4 * k_blocks * (round_up(n_cols, QUANT_BLOCK) // QUANT_BLOCK)
        if table_bytes > TPU_SMEM_SCALE_TABLE_MAX_BYTES:
            raise NotImplementedError(
                f"block-scale table of {table_bytes} bytes exceeds the SMEM "
                f"budget of {TPU_SMEM_SCALE_TABLE_MAX_BYTES} bytes"
            )


def _select_column(table_RC: jax.Array, index) -> jax.Array:
    """table[:, index] as [R, 1] via an iota mask (exact: one non-zero term per row)."""
    cols = lax.broadcasted_iota(jnp.int32, table_RC.shape, 1)
    return jnp.sum(jnp.where(cols == index, table_RC, 0.0), axis=1, keepdims=True)


def _select_row(table_RC: jax.Array, index) -> jax.Array:
    """table[index, :] as [1, C] via an iota mask."""
    rows = lax.broadcasted_iota(jnp.int32, table_RC.shape, 0)
    return jnp.sum(jnp.where(rows == index, table_RC, 0.0), axis=0, keepdims=True)


def _gemm_kernel(
    a_q_ref, a_s_ref, b_q_ref, b_s_ref, out_ref, acc_ref, *, b_block_scales: bool, n_blocks_n: int, mxu_dtype
):
    j = pl.program_id(1)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    a_q = a_q_ref[...]
    b_q = b_q_ref[...]
    if a_q.dtype != mxu_dtype:
        a_q, b_q = a_q.astype(mxu_dtype), b_q.astype(mxu_dtype)
    part_mn = jnp.dot(a_q, b_q, preferred_element_type=jnp.float32)
    a_scale_m1 = _select_column(a_s_ref[...], k)
    if b_block_scales:
        # The tile spans bn / 128 weight blocks: gather their SMEM scalars into a [1, bn] row.
        bn = part_mn.shape[1]
        block_of_lane = lax.broadcasted_iota(jnp.int32, (1, bn), 1) // QUANT_BLOCK
        b_scale_1n = jnp.zeros((1, bn), jnp.float32)
        for c in range(bn // QUANT_BLOCK):
            b_scale_c = b_s_ref[k * n_blocks_n + j * (bn // QUANT_BLOCK) + c]
            b_scale_1n = jnp.where(block_of_lane == c, b_scale_c, b_scale_1n)
        scale = a_scale_m1 * b_scale_1n
    else:
        scale = a_scale_m1 * _select_row(b_s_ref[...], k)
    acc_ref[...] += part_mn * scale

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def pallas_scaled_matmul(
    a_q_MKp,
    a_s_MKb,
    b_q_KpN,
    b_s,
    *,
    b_block_scales: bool,
    out_dtype=jnp.float32,
    config: Fp8MatmulConfig = Fp8MatmulConfig(),
) -> jax.Array:
    """Same contract as `reference.scaled_matmul_reference`, computed by the Pallas kernel.

    Pads M to the row tile and N to the column tile (zero operands, unit scales) and slices
    the result back. Raises NotImplementedError for unsupported cases (see check_supported).
    """
    check_gemm_operands(a_q_MKp, a_s_MKb, b_q_KpN, b_s, b_block_scales)
    interpret = resolve_interpret(config)
    m, kp = a_q_MKp.shape
    n = b_q_KpN.shape[1]
    kb = kp // QUANT_BLOCK
    bm = min(config.block_m, round_up(m, TPU_FP8_SUBLANES))
    bn = min(config.block_n, round_up(n, TPU_LANES))
    check_supported(kb, n, b_block_scales, bm, bn)
    mp, np_ = round_up(m, bm), round_up(n, bn)
    a_q = jnp.pad(a_q_MKp, ((0, mp - m), (0, 0)))
    a_s = jnp.pad(a_s_MKb, ((0, mp - m), (0, 0)), constant_values=1.0)
    b_q = jnp.pad(b_q_KpN, ((0, 0), (0, np_ - n)))
    nb = np_ // QUANT_BLOCK
    if b_block_scales:  # the whole [Kb, Nb] table in SMEM, flattened to 1-D scalar storage
        b_s_arg = jnp.pad(b_s, ((0, 0), (0, nb - b_s.shape[1])), constant_values=1.0).reshape(-1)
        b_s_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:  # per-column scales, one [Kb, bn] VMEM block per column tile
        b_s_arg = jnp.pad(b_s, ((0, 0), (0, np_ - n)), constant_values=1.0)
        b_s_spec = pl.BlockSpec((kb, bn), lambda i, j, k: (0, j))

    kernel = functools.partial(
        _gemm_kernel, b_block_scales=b_block_scales, n_blocks_n=nb, mxu_dtype=jnp.dtype(config.mxu_dtype)
    )
    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn, kb),
        in_specs=[
            pl.BlockSpec((bm, QUANT_BLOCK), lambda i, j, k: (i, k)),
            pl.BlockSpec((bm, kb), lambda i, j, k: (i, 0)),
            pl.BlockSpec((QUANT_BLOCK, bn), lambda i, j, k: (k, j)),
            b_s_spec,
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=shard_typing.out_struct((mp, np_), out_dtype, a_q, b_q),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="blockwise_fp8_matmul",
    )(a_q, a_s.astype(jnp.float32), b_q, b_s_arg.astype(jnp.float32))
    return out[:m, :n]
