"""Ling 2.0 MoE block: sigmoid router with expert bias, dropless routed experts, shared expert."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ling_jax.config import ModelConfig
from ling_jax.layers.basic import param_with_axes
from ling_jax.layers.dispatch import ExpertWeights, default_dispatch, dispatch
from ling_jax.layers.mlp import MLP
from ling_jax.layers.routing import expert_counts, route

EXPERT_BIAS = "expert_bias"  # variable collection of the aux-loss-free routing biases (float32)


class RouterStats(NamedTuple):
    """What one MoE layer reports: routed tokens per expert [E], and for tests / z-loss the raw
    router logits [B, T, E] and the routing decision ids / weights [B, T, k]."""

    counts_E: jax.Array
    logits_BTE: jax.Array
    ids_BTk: jax.Array
    weights_BTk: jax.Array


class MoE(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, token_mask_BT: jax.Array) -> tuple[jax.Array, RouterStats]:
        cfg = self.config
        B, T, D = x_BTD.shape
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        pdtype, dtype = cfg.jnp_param_dtype, cfg.jnp_dtype
        normal = nn.initializers.normal(cfg.init_std)

        router_DE = param_with_axes(self, "router", normal, (D, E), ("embed", "router_exp"), jnp.float32)
        bias_E = self.variable(
            EXPERT_BIAS, "bias", nn.with_logical_partitioning(jnp.zeros, ("router_exp",)), (E,), jnp.float32
        ).value
        experts = ExpertWeights(
            param_with_axes(self, "gate_proj", normal, (E, D, F), ("exp", "embed_moe", "mlp_moe"), pdtype),
            param_with_axes(self, "up_proj", normal, (E, D, F), ("exp", "embed_moe", "mlp_moe"), pdtype),
            param_with_axes(self, "down_proj", normal, (E, F, D), ("exp", "mlp_moe", "embed_moe"), pdtype),
        )

        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = jnp.einsum("ND,DE->NE", x_ND.astype(jnp.float32), router_DE.astype(jnp.float32))
        ids_Nk, weights_Nk = route(
            logits_NE,
            bias_E,
            top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        experts = ExpertWeights(*(w.astype(dtype) for w in experts))
        impl = default_dispatch(jax.default_backend()) if cfg.moe_dispatch == "auto" else cfg.moe_dispatch
        y_ND = dispatch(x_ND.astype(dtype), ids_Nk, weights_Nk, experts, impl=impl)
        y_BTD = y_ND.reshape(B, T, D)
        if cfg.num_shared_experts:
            y_BTD = y_BTD + MLP(cfg, cfg.shared_intermediate_size, name="shared_experts")(x_BTD)
        stats = RouterStats(
            counts_E=expert_counts(ids_Nk, E, token_mask_BT.reshape(-1)),
            logits_BTE=logits_NE.reshape(B, T, E),
            ids_BTk=ids_Nk.reshape(B, T, -1),
            weights_BTk=weights_Nk.reshape(B, T, -1),
        )
        return checkpoint_name(y_BTD, "moe_out"), stats
