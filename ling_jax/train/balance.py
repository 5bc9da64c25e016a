"""Aux-loss-free expert balancing (Ling 2.0 / DeepSeek-V3 style) and expert-load metrics.

After each step, per MoE layer, with token counts c_i summed over the whole global batch:
    e_i = mean(c) - c_i;   b_i += u * (sign(e_i) - mean_j sign(e_j))
The update is zero-mean, so the biases' mean never drifts; biases are float32 and live outside
`params`, so the optimizer never touches them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ling_jax.config import ModelConfig
from ling_jax.layers.decoder import MOE, MTP_DECODER, mtp_name
from ling_jax.layers.moe import BIAS
from ling_jax.layers.stack import MOE_STACK, SCANNED_LAYERS, layer_name


def counts_like_bias(cfg: ModelConfig, counts_main_LE, counts_mtp_ME) -> dict:
    """Arranges per-layer counts into the `expert_bias` collection's tree structure, from the module
    names the layers define (ling_jax/layers/stack.py, decoder.py, moe.py)."""
    tree = {}
    if cfg.num_moe_layers:
        if cfg.scan_layers:
            tree[MOE_STACK] = {SCANNED_LAYERS: {MOE: {BIAS: counts_main_LE}}}
        else:
            tree[MOE_STACK] = {layer_name(i): {MOE: {BIAS: counts_main_LE[i]}} for i in range(cfg.num_moe_layers)}
    for i in range(cfg.num_mtp_layers):
        tree[mtp_name(i)] = {MTP_DECODER: {MOE: {BIAS: counts_mtp_ME[i]}}}
    return tree


def bias_delta(counts_E: jax.Array, rate: float) -> jax.Array:
    """The zero-mean sign update for counts [..., E] (leading axes are layers)."""
    error = jnp.mean(counts_E, axis=-1, keepdims=True) - counts_E
    direction = jnp.sign(error)
    return rate * (direction - jnp.mean(direction, axis=-1, keepdims=True))


def update_expert_bias(expert_bias, counts_tree, rate: float):
    return jax.tree.map(
        lambda b, c: (b + bias_delta(c.astype(jnp.float32), rate)).astype(b.dtype), expert_bias, counts_tree
    )


def load_metrics(counts_LE: jax.Array) -> dict[str, jax.Array]:
    """Per-layer max/mean load and coefficient of variation of expert token counts [L, E]."""
    mean_L = jnp.maximum(jnp.mean(counts_LE, axis=-1), 1e-9)
    return {"load_max_over_mean": jnp.max(counts_LE, axis=-1) / mean_L, "load_cv": jnp.std(counts_LE, axis=-1) / mean_L}
