"""A stack of identical decoder layers: `nn.scan` over depth (compile time independent of depth)
or an unrolled Python loop (same math, per-layer parameter names), with optional remat."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import ModelConfig
from ling_jax.layers.decoder import DecoderLayer
from ling_jax.layers.moe import EXPERT_BIAS
from ling_jax.ops.fp8 import FP8_STATS

SCANNED_LAYERS = "layers"  # the one scanned layer module of a stack (scan_layers), stacked over depth


def layer_name(i: int) -> str:
    """Layer i of an unrolled stack (scan_layers off)."""
    return f"{SCANNED_LAYERS}_{i}"


def stack_name(kind: str) -> str:
    """The LayerStack module of one kind of layer ("dense", "moe") in the model."""
    return f"{kind}_stack"


MOE_STACK = stack_name("moe")  # the MoE layers' stack, holding every main-model expert bias


def remat_policy(name: str):
    """Maps config.remat_policy to a jax.checkpoint policy (None = save nothing)."""
    policies = {
        "full": None,
        "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
        "save_moe_out": jax.checkpoint_policies.save_only_these_names("attn_out", "moe_out"),
    }
    return policies[name]


class LayerStack(nn.Module):
    config: ModelConfig
    is_moe: bool
    num_layers: int

    @nn.compact
    def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_BTS, token_mask_BT, cache_index, cache_L):
        cfg = self.config
        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)
        broadcast = (cos_BTR, sin_BTR, mask_BTS, token_mask_BT, cache_index)
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0, EXPERT_BIAS: 0, FP8_STATS: 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(broadcast) + (0,),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},  # the logical axis name (rules table)
            )
            return scanned(cfg, self.is_moe, name=SCANNED_LAYERS)(x_BTD, *broadcast, cache_L)
        per_layer = []
        for i in range(self.num_layers):
            cache = None if cache_L is None else jax.tree.map(lambda c: c[i], cache_L)
            x_BTD, ys = layer_cls(cfg, self.is_moe, name=layer_name(i))(x_BTD, *broadcast, cache)
            per_layer.append(ys)
        return x_BTD, jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
