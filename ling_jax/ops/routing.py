"""Ling 2.0 router math: sigmoid scores, aux-loss-free expert bias, group-limited top-k.

Selection uses the biased scores s + b; the weights are the UNBIASED s at the chosen experts,
renormalised (when k > 1) and multiplied by the routed scaling factor. Ties go to the lowest
expert index (as torch.topk / lax.top_k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ling_jax.ops.pallas_target import pallas_interpret, token_wise
from pallas_kernels.topk_router import RouterKernelConfig, sigmoid_topk_route


def route(
    logits_E: jax.Array,
    expert_bias_E: jax.Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """(expert_ids [..., k] int32, weights [..., k] float32) for router logits [..., E] ([N, E], or
    [B, T, E] as the MoE layer passes them so that a sequence split over the context axis stays
    split) through the router op (pallas_kernels/topk_router), whose VJP reaches the logits through
    the weights.

    `impl` (a model's `router_impl`): "xla" the lax.top_k reference, "pallas" the max-and-mask kernel,
    compiled for a TPU target and interpreted on a CPU one, per batch (and sequence) shard under a mesh
    (ling_jax/ops/pallas_target.py). Both select the same experts (ties to the lowest
    index) and give the same weights and gradients.
    """

    def op(logits_NE, expert_bias_E):
        config = RouterKernelConfig(interpret=pallas_interpret()) if impl == "pallas" else None
        return sigmoid_topk_route(
            logits_NE,
            expert_bias_E,
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor,
            impl=impl,
            config=config,
        )

    # a Mosaic kernel runs per batch (and sequence) shard: GSPMD cannot partition it
    return token_wise(op, logits_E, (expert_bias_E,), kernel=impl == "pallas", token_dims=logits_E.ndim - 1)


def expert_counts(ids_k: jax.Array, num_experts: int, token_mask: jax.Array | None = None) -> jax.Array:
    """Tokens routed to each expert [E] (float32) from expert ids [..., k], counting only tokens where
    token_mask [...] is set."""
    one_hot_kE = jax.nn.one_hot(ids_k, num_experts, dtype=jnp.float32)
    if token_mask is not None:
        one_hot_kE = one_hot_kE * token_mask.astype(jnp.float32)[..., None, None]
    return one_hot_kE.sum(axis=tuple(range(one_hot_kE.ndim - 1)))
