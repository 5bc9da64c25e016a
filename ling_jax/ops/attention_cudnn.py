"""Causal self-attention through cuDNN's fused flash attention on NVIDIA GPUs
(`jax.nn.dot_product_attention(implementation="cudnn")`).

cuDNN takes the causal mask natively (`is_causal`, the upper triangle is skipped, not computed);
the packed rows' segment structure goes in as a boolean [B, 1, T, S] mask (same segment), which
jax.nn hands to cuDNN as an additive bias: that bias is T x S per row, so for very long packed rows
the XLA path's query chunks or context parallelism hold less memory. cuDNN refuses some shapes and
dtypes (e.g. float32 operands, head dims it has no kernel for); `cudnn_attention` raises then and
the caller (`ling_jax.ops.attention_impl.attention`) falls back to the XLA core with a one-time
warning naming cuDNN's reason.
"""

from __future__ import annotations

import math

import jax


def cudnn_attention(q_BTHd, k_BSKd, v_BSKd, q_segment_BT, kv_segment_BS) -> jax.Array:
    """Causal grouped-query self-attention within segments, [B, T, H, Dh] out. Raises (ValueError,
    NotImplementedError, RuntimeError from jax.nn / cuDNN) where cuDNN cannot take the operands."""
    same_segment_B1TS = (q_segment_BT[:, :, None] == kv_segment_BS[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BTHd,
        k_BSKd,
        v_BSKd,
        mask=same_segment_B1TS,
        scale=1.0 / math.sqrt(q_BTHd.shape[-1]),
        is_causal=True,
        implementation="cudnn",
    )
