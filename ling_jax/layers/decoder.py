"""Pre-norm decoder layer (attention + dense SwiGLU or MoE) and the multi-token-prediction layer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import Attention, KVCache
from ling_jax.layers.basic import RMSNorm, projection
from ling_jax.layers.mlp import MLP
from ling_jax.layers.moe import MoE

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")
MOE = "moe"  # a DecoderLayer's MoE block
MTP_DECODER = "layer"  # an MTPLayer's decoder layer


def mtp_name(i: int) -> str:
    """The model's MTP layer i."""
    return f"mtp_{i}"


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)). Scanned over depth, so the call is carry-shaped:

    (x_BTD, cache | None) -> (x_BTD, (x_BTD, router stats | None, new cache | None)).
    """

    config: ModelConfig
    is_moe: bool

    @nn.compact
    def __call__(
        self, x_BTD, cos_BTR, sin_BTR, mask_BTS, token_mask_BT=None, cache_index=None, cache: KVCache | None = None
    ):
        cfg = self.config
        pdtype = cfg.jnp_param_dtype
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        h_BTD = RMSNorm(cfg.rms_norm_eps, "norm", pdtype, name="input_norm")(x_BTD)
        attn_BTD, new_cache = Attention(cfg, name="attention")(h_BTD, cos_BTR, sin_BTR, mask_BTS, cache, cache_index)
        x_BTD = x_BTD + attn_BTD
        h_BTD = RMSNorm(cfg.rms_norm_eps, "norm", pdtype, name="post_attention_norm")(x_BTD)
        if self.is_moe:
            ffn_BTD, stats = MoE(cfg, name=MOE)(h_BTD, token_mask_BT)
        else:
            ffn_BTD, stats = MLP(cfg, cfg.intermediate_size, name="mlp")(h_BTD), None
        x_BTD = nn.with_logical_constraint(x_BTD + ffn_BTD, ACTIVATION_AXES)
        return x_BTD, (x_BTD, stats, new_cache)


class MTPLayer(nn.Module):
    """Multi-token prediction: z = eh_proj([enorm(embed(ids shifted)), hnorm(h)]), a full MoE
    decoder layer on z, then its own final norm. The lm_head is the main model's."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, emb_BTD, h_BTD, cos_BTR, sin_BTR, mask_BTS, token_mask_BT, cache_index=None, cache: KVCache | None = None
    ) -> tuple[jax.Array, Any, KVCache | None]:
        """(hidden [B, T, D] after the final norm, router stats, new cache | None). With a `cache`
        (speculative drafting) the decoder layer's attention reads and extends it at `cache_index`."""
        cfg = self.config
        pdtype = cfg.jnp_param_dtype
        e_BTD = RMSNorm(cfg.rms_norm_eps, "norm", pdtype, name="enorm")(emb_BTD)
        h_BTD = RMSNorm(cfg.rms_norm_eps, "norm", pdtype, name="hnorm")(h_BTD)
        eh_BT2D = jnp.concatenate([e_BTD, h_BTD], axis=-1)
        D = cfg.hidden_size
        z_BTD = projection(cfg, (2 * D, D), ("embed_concat", "embed"), "eh_proj")("BTC,CD->BTD", eh_BT2D)
        z_BTD, (_, stats, new_cache) = DecoderLayer(cfg, is_moe=True, name=MTP_DECODER)(
            z_BTD, cos_BTR, sin_BTR, mask_BTS, token_mask_BT, cache_index, cache
        )
        return RMSNorm(cfg.rms_norm_eps, "norm", pdtype, name="final_norm")(z_BTD), stats, new_cache
