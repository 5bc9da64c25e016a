"""Grouped-query attention with QK RMSNorm, partial RoPE, segment masking and a fixed-size KV cache."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ling_jax.config import ModelConfig
from ling_jax.layers.basic import RMSNorm, param_with_axes, projection
from ling_jax.ops.attention_core import AttentionMask
from ling_jax.ops.attention_impl import attention
from ling_jax.ops.rope import apply_rope


class KVCache(NamedTuple):
    """One layer's cache: keys and values [B, S, K, Dh] for S slots."""

    k_BSKd: jax.Array
    v_BSKd: jax.Array


def attention_mask(q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS) -> AttentionMask:
    """Query t may attend key s where both are in the same segment and s is not in the future.

    Causality is by slot index (packed documents restart their positions, so positions cannot be
    used); segment 0 marks padding / empty cache slots, which real tokens never attend to. Returned
    unmaterialised (`AttentionMask`, `.dense()` gives the [B, T, S] array): the splash kernel and the
    context-parallel path build their masks from these parts.
    """
    return AttentionMask(q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS)


def write_slots(cache_BS_, new_BT_, index):
    """cache_BS_ with new_BT_ written at slots index .. index + T - 1. `index` is an int32 scalar (the
    same slot for every row) or [B] (each row its own slot, as speculative decoding needs when rows
    accept different numbers of tokens); per-row writes past the last slot are dropped."""
    new_BT_ = new_BT_.astype(cache_BS_.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache_BS_, new_BT_, (0, index) + (0,) * (cache_BS_.ndim - 2))
    B, T = new_BT_.shape[:2]
    slots_BT = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return cache_BS_.at[jnp.arange(B)[:, None], slots_BT].set(new_BT_, mode="drop")


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cos_BTR, sin_BTR, mask: AttentionMask, cache: KVCache | None = None, cache_index=None):
        cfg = self.config
        dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
        H, K, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

        def proj(name, heads, axes):
            return projection(cfg, (D, heads, Dh), ("embed", axes, "head_dim"), name)

        q_BTHd = proj("q_proj", H, "q_heads")("BTD,DHd->BTHd", x_BTD)
        k_BTKd = proj("k_proj", K, "kv_heads")("BTD,DKd->BTKd", x_BTD)
        v_BTKd = proj("v_proj", K, "kv_heads")("BTD,DKd->BTKd", x_BTD)
        if cfg.use_qkv_bias:
            init = nn.initializers.zeros
            q_BTHd += param_with_axes(self, "q_bias", init, (H, Dh), ("q_heads", "head_dim"), pdtype).astype(dtype)
            k_BTKd += param_with_axes(self, "k_bias", init, (K, Dh), ("kv_heads", "head_dim"), pdtype).astype(dtype)
            v_BTKd += param_with_axes(self, "v_bias", init, (K, Dh), ("kv_heads", "head_dim"), pdtype).astype(dtype)
        if cfg.use_qk_norm:
            q_BTHd = RMSNorm(cfg.rms_norm_eps, "head_dim", pdtype, name="query_norm")(q_BTHd)
            k_BTKd = RMSNorm(cfg.rms_norm_eps, "head_dim", pdtype, name="key_norm")(k_BTKd)
        q_BTHd = apply_rope(q_BTHd, cos_BTR, sin_BTR)
        k_BTKd = apply_rope(k_BTKd, cos_BTR, sin_BTR)

        new_cache = None
        if cache is not None:
            k_BSKd = write_slots(cache.k_BSKd, k_BTKd, cache_index)
            v_BSKd = write_slots(cache.v_BSKd, v_BTKd, cache_index)
            new_cache = KVCache(k_BSKd, v_BSKd)
            k_BTKd, v_BTKd = k_BSKd.astype(dtype), v_BSKd.astype(dtype)

        # Without a cache the keys are the queries' own slots (causal self-attention).
        out_BTHd = attention(q_BTHd, k_BTKd, v_BTKd, mask, impl=cfg.attention_impl, cached=cache is not None)
        out_BTD = projection(cfg, (H, Dh, D), ("q_heads", "head_dim", "embed"), "o_proj", contract=2)(
            "BTHd,HdD->BTD", out_BTHd
        )
        if cfg.use_bias:
            out_BTD += param_with_axes(self, "o_bias", nn.initializers.zeros, (D,), ("embed",), pdtype).astype(dtype)
        return checkpoint_name(out_BTD, "attn_out"), new_cache
