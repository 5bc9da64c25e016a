"""FP8 (e4m3) quantization in [1, 128] tiles and [128, 128] blocks, float32 scales.

For a group g of values (a tile or a block): scale_g = amax(|g|) * (1 / FP8_E4M3_MAX) in float32
(1.0 when the group is all zero; written as a product because XLA rewrites division by a
constant into that product anyway, and the spec must be reproducible bit for bit),
q = clip(g / scale_g, -448, 448) cast to float8_e4m3fn (round to nearest
even). Dequantized value = float32(q) * scale_g. Inputs whose sizes are not multiples of 128 are
zero-padded up to the next multiple; the padding quantizes to exact zeros.

Axis letters: R rows, C columns of the array being quantized; Cp = C padded to 128, Cb = Cp/128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul.config import FP8_DTYPE, FP8_E4M3_MAX, QUANT_BLOCK


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def scale_from_amax(amax: jax.Array) -> jax.Array:
    """float32 scale amax * (1/448) mapping amax onto ~FP8_E4M3_MAX; 1.0 for all-zero groups."""
    amax = amax.astype(jnp.float32)
    return jnp.where(amax > 0, amax * jnp.float32(1.0 / FP8_E4M3_MAX), jnp.float32(1.0))


def _to_fp8(values: jax.Array, scale: jax.Array) -> jax.Array:
    scaled = jnp.clip(values / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return scaled.astype(FP8_DTYPE)


def _pad_to(x: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def quantize_tiles(x_RC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantizes each row in [1, 128] tiles along the last axis.

    Returns (q_RCp float8_e4m3fn [R, Cp], scales_RCb float32 [R, Cb]).
    """
    if x_RC.ndim != 2:
        raise ValueError(f"quantize_tiles expects a 2-D array, got shape {x_RC.shape}")
    n_rows, n_cols = x_RC.shape
    n_cols_p = round_up(n_cols, QUANT_BLOCK)
    x_RCp = _pad_to(x_RC.astype(jnp.float32), n_rows, n_cols_p)
    x_RCbQ = x_RCp.reshape(n_rows, n_cols_p // QUANT_BLOCK, QUANT_BLOCK)
    scales_RCb = scale_from_amax(jnp.max(jnp.abs(x_RCbQ), axis=-1))
    q_RCbQ = _to_fp8(x_RCbQ, scales_RCb[..., None])
    return q_RCbQ.reshape(n_rows, n_cols_p), scales_RCb


def quantize_blocks(w_RC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantizes a matrix in [128, 128] blocks.

    Returns (q_RpCp float8_e4m3fn [Rp, Cp], scales_RbCb float32 [Rb, Cb]).
    """
    if w_RC.ndim != 2:
        raise ValueError(f"quantize_blocks expects a 2-D array, got shape {w_RC.shape}")
    n_rows_p = round_up(w_RC.shape[0], QUANT_BLOCK)
    n_cols_p = round_up(w_RC.shape[1], QUANT_BLOCK)
    n_rb, n_cb = n_rows_p // QUANT_BLOCK, n_cols_p // QUANT_BLOCK
    w_RpCp = _pad_to(w_RC.astype(jnp.float32), n_rows_p, n_cols_p)
    w_RbQCbQ = w_RpCp.reshape(n_rb, QUANT_BLOCK, n_cb, QUANT_BLOCK)
    scales_RbCb = scale_from_amax(jnp.max(jnp.abs(w_RbQCbQ), axis=(1, 3)))
    q_RbQCbQ = _to_fp8(w_RbQCbQ, scales_RbCb[:, None, :, None])
    return q_RbQCbQ.reshape(n_rows_p, n_cols_p), scales_RbCb
