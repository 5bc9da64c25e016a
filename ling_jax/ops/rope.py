"""Rotary position embedding on the first R = head_dim * partial_rotary_factor dims, with YaRN.

Rotate-half convention: pairs (i, i + R/2). Inverse frequencies are computed on the host in
float32 exactly as the reference (torch, float32) does, so positions and angles match bit for bit
in the common cases; YaRN blends original and interpolated frequencies with a linear ramp and
scales cos and sin by the attention factor 0.1 ln(factor) + 1.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ling_jax.config import ModelConfig, RopeScaling


def _pow_f32(base: float, dim: int) -> np.ndarray:
    """base ** (2i / dim) as float32, correctly rounded (what torch's float32 pow returns)."""
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    return (np.float64(base) ** exponent.astype(np.float64)).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_inv_freq(scaling: RopeScaling, dim: int, base: float, max_position_embeddings: int):
    # As in the reference: with original_max_position_embeddings given, the effective factor is
    # max_position_embeddings / original (for Ling 2.0 configs this equals rope_scaling.factor).
    original = scaling.original_max_position_embeddings
    factor = max_position_embeddings / original
    if scaling.attention_factor is not None:
        attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    low = _yarn_correction_dim(scaling.beta_fast, dim, base, original)
    high = _yarn_correction_dim(scaling.beta_slow, dim, base, original)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = _pow_f32(base, dim)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = np.float32(1.0) - ramp.astype(np.float32)
    inv_freq = interpolation * (np.float32(1.0) - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_parameters(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [R/2] float32, attention_scaling) for the config."""
    dim = config.rotary_dim
    if config.rope_scaling is None:
        inv_freq = np.float32(1.0) / _pow_f32(config.rope_theta, dim)
        return inv_freq.astype(np.float32), 1.0
    return _yarn_inv_freq(config.rope_scaling, dim, config.rope_theta, config.max_position_embeddings)


def rope_cos_sin(positions_BT: jnp.ndarray, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [B, T, R] in float32 for integer positions."""
    inv_freq, attention_scaling = rope_parameters(config)
    freqs_BTr = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb_BTR = jnp.concatenate([freqs_BTr, freqs_BTr], axis=-1)
    return jnp.cos(emb_BTR) * attention_scaling, jnp.sin(emb_BTR) * attention_scaling


def apply_rope(x_BTHDh: jnp.ndarray, cos_BTR: jnp.ndarray, sin_BTR: jnp.ndarray) -> jnp.ndarray:
    """Rotates the first R dims of each head (rotate-half pairs (i, i+R/2)); the rest pass through.

    H is whichever heads `x` holds: query heads, or key/value heads (K) for keys."""
    rotary_dim = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTHDh[..., :rotary_dim], x_BTHDh[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    x_rot = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BTHDh.dtype)
    return jnp.concatenate([x_rot, x_pass], axis=-1)
