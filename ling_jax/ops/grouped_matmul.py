"""Grouped matmul for the "ragged" dispatch: rows of `lhs` sorted by group, out[rows of g] = lhs[rows of g] @ rhs[g].

    grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G) -> out_MN      (same contract as `lax.ragged_dot`)

On Hopper GPUs (compute capability 9.x) with bfloat16/float16 operands and tile-aligned K and N, it runs the
Pallas Mosaic-GPU grouped GEMMs that ship with JAX (`jax.experimental.pallas.ops.gpu`): `ragged_dot_mgpu` for
the forward and for d lhs = d out @ rhs[g]^T (its `transpose_rhs` mode reads rhs in place), and
`transposed_ragged_dot_mgpu` for d rhs[g] = lhs[rows of g]^T @ d out[rows of g], tied together by a custom VJP.
Every other case runs `lax.ragged_dot` (TPU: XLA's grouped GEMM; CPU: a masked dense dot). Measured on one H200
(benchmarks/README.md, "MoE layer on GPU"): XLA:GPU's `lax.ragged_dot` made a 64-expert MoE layer ~70x its dense
floor and ran a 16K-token train step out of memory, which is why this path exists.

Rows past sum(group_sizes) are not written by the kernels' contract; the dispatch always passes group sizes
that sum to M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ling_jax.ops.pallas_target import kernel_target

# Tiles of the Mosaic-GPU kernels (wgmma: M tile 64 or 128; K tile 64 bf16 = one 128-byte swizzle row).
MGPU_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
MGPU_DTYPES = (jnp.bfloat16, jnp.float16)


def is_hopper() -> bool:
    """Whether the traced program targets a Hopper GPU (compute capability 9.x; `kernel_target()`:
    the context mesh's devices, else the default device)."""
    return kernel_target().is_hopper


def mgpu_supported(lhs_MK: jax.Array, rhs_GKN: jax.Array) -> bool:
    """Whether the Mosaic-GPU path takes these operands (else `lax.ragged_dot` runs)."""
    K, N = rhs_GKN.shape[1], rhs_GKN.shape[2]
    t = MGPU_TILES
    return (
        is_hopper()
        and lhs_MK.dtype == rhs_GKN.dtype
        and lhs_MK.dtype in MGPU_DTYPES
        and K % t["block_k"] == 0
        and K % t["block_m"] == 0  # K is the drhs kernel's M
        and N % t["block_n"] == 0
    )


def _mgpu_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, *, transpose_rhs: bool):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # GPU-only import (Mosaic GPU)

    return ragged_dot_mgpu.ragged_dot(
        lhs_MK, rhs_GKN, group_sizes=group_sizes_G, transpose_rhs=transpose_rhs, **MGPU_TILES
    )


def _mgpu_transposed_ragged_dot(lhs_MK, dout_MN, group_sizes_G):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs_MK, dout_MN, group_sizes=group_sizes_G, **MGPU_TILES)


@jax.custom_vjp
def _mgpu_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G):
    return _mgpu_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, transpose_rhs=False)


def _mgpu_fwd(lhs_MK, rhs_GKN, group_sizes_G):
    return _mgpu_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G), (lhs_MK, rhs_GKN, group_sizes_G)


def _mgpu_bwd(residuals, dout_MN):
    lhs_MK, rhs_GKN, group_sizes_G = residuals
    dout_MN = dout_MN.astype(lhs_MK.dtype)
    dlhs_MK = _mgpu_ragged_dot(dout_MN, rhs_GKN, group_sizes_G, transpose_rhs=True)
    drhs_GKN = _mgpu_transposed_ragged_dot(lhs_MK, dout_MN, group_sizes_G)
    group_sizes_ct = jnp.zeros(group_sizes_G.shape, jax.dtypes.float0)
    return dlhs_MK, drhs_GKN.astype(rhs_GKN.dtype), group_sizes_ct


_mgpu_grouped_matmul.defvjp(_mgpu_fwd, _mgpu_bwd)


def grouped_matmul(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """`lax.ragged_dot(lhs, rhs, group_sizes)`, on the Mosaic-GPU grouped GEMMs where they apply."""
    if mgpu_supported(lhs_MK, rhs_GKN):
        return _mgpu_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32))
    return lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G)


__all__ = ["MGPU_TILES", "grouped_matmul", "is_hopper", "mgpu_supported"]
