"""Ling 2.0 MoE block: sigmoid router with expert bias, dropless routed experts, shared expert.

Routing (router logits, group-limited sigmoid top-k with the expert bias) runs on the global token
set as written, so GSPMD partitions it and `RouterStats.counts_E` are global sums: the aux-loss-free
bias update is the same on every mesh. The routed experts then run per shard:

- No mesh in context (`jax.sharding.get_abstract_mesh()` empty), or one whose batch and sequence
  axes (those ling_jax/sharding/rules.py gives "activation_batch": data, fsdp, expert, and
  "activation_length": context) hold one device: `dispatch` on all tokens, as on one device.
- Otherwise (e.g. the train step, which traces under `jax.set_mesh(mesh)`): `per_shard_dispatch`
  (ling_jax/ops/expert_parallel.py), a `jax.shard_map` in which every device dispatches only its
  own [B, T] block of tokens (the layer keeps [B, T] unmerged so that the sequence stays split over
  context), so the "ragged" / "blocked" expert sort covers n * k local assignments instead of the
  global batch's N * k (which GSPMD cannot split). The implementation is `select_moe_impl`'s, for
  the devices the step is traced for. With mesh axis "expert" > 1 the experts stay
  split over it and tokens travel by all-to-all; otherwise every device gathers all experts'
  weights (sharded "embed_moe" -> fsdp and context). The expert width ("mlp_moe" -> model) stays split: each
  model-axis device computes its F-slice and the partial outputs are summed over "model".
  If the batch or the sequence does not split evenly over its axes, or those axes are already manual
  (the model called inside someone's shard_map), the global `dispatch` is used.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ling_jax.config import ModelConfig
from ling_jax.layers.basic import param_with_axes
from ling_jax.layers.mlp import MLP
from ling_jax.ops.dispatch import ExpertWeights, Query, Selection, dispatch, kernel_built, select_impl, warn_fallback
from ling_jax.ops.expert_parallel import ExpertParallelOutput, dispatch_axes, per_shard_dispatch, token_shards
from ling_jax.ops.fp8 import fp8_impl
from ling_jax.ops.pallas_target import Target, kernel_target
from ling_jax.ops.routing import expert_counts, route

EXPERT_BIAS = "expert_bias"  # variable collection of the aux-loss-free routing biases (float32)
BIAS = "bias"  # the variable holding one MoE layer's biases [E] in EXPERT_BIAS


def expert_query(cfg: ModelConfig, target: Target, built: bool | None = None) -> Query:
    """What the routed-expert choice depends on for `cfg` on `target`: the experts run in the compute
    dtype, in FP8 when `cfg.fp8` is on; `built` defaults to this machine's CPU kernel."""
    return Query(target, cfg.jnp_dtype, fp8_impl(cfg.fp8), kernel_built() if built is None else built)


def select_moe_impl(cfg: ModelConfig, target: Target, built: bool | None = None) -> Selection:
    """The routed-expert implementation a model with `cfg` runs on `target` (`select_impl` over
    `cfg.moe_dispatch`): what the MoE layer runs and what the planner compiles."""
    return select_impl(cfg.moe_dispatch, expert_query(cfg, target, built))


class RouterStats(NamedTuple):
    """What one MoE layer reports: routed tokens per expert [E], and for tests / z-loss the raw
    router logits [B, T, E] and the routing decision ids / weights [B, T, k]."""

    counts_E: jax.Array
    logits_BTE: jax.Array
    ids_BTk: jax.Array
    weights_BTk: jax.Array
    dropped: jax.Array  # int32 []: assignments dropped for lack of expert-parallel capacity (0 when dropless)


def dispatch_mesh(batch: int, length: int):
    """The context mesh if the routed experts should run per shard on it (see the module docstring),
    else None: [B, T] tokens with B split over the batch axes, T over the context axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return None
    axes = dispatch_axes(mesh)
    batch_shards = token_shards(mesh, axes.tokens)
    length_shards = token_shards(mesh, axes.length)
    if batch_shards * length_shards == 1 or batch % batch_shards or length % length_shards:
        return None
    return mesh


def routed_experts(
    x_BTD,
    ids_BTk,
    weights_BTk,
    experts: ExpertWeights,
    *,
    impl: str,
    capacity_factor: float | None = None,
    fp8_impl: str | None = None,
) -> ExpertParallelOutput:
    """y[b, t] = sum_j weights[b, t, j] * expert_{ids[b, t, j]}(x[b, t]) [B, T, D], per shard under a
    mesh (each device its [B, T] block), else global, and the dropped-assignment count
    (`capacity_factor`: expert parallelism only, see ling_jax/ops/expert_parallel.py). `fp8_impl`: the
    model's FP8 mode for the expert GEMMs."""
    B, T, D = x_BTD.shape
    mesh = dispatch_mesh(B, T)
    if mesh is None:
        y_ND = dispatch(
            x_BTD.reshape(B * T, D),
            ids_BTk.reshape(B * T, -1),
            weights_BTk.reshape(B * T, -1),
            experts,
            impl=impl,
            fp8_impl=fp8_impl,
        )
        return ExpertParallelOutput(y_ND.reshape(B, T, D), jnp.zeros((), jnp.int32))
    return per_shard_dispatch(
        x_BTD, ids_BTk, weights_BTk, experts, mesh=mesh, impl=impl, capacity_factor=capacity_factor, fp8_impl=fp8_impl
    )


class MoE(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, token_mask_BT: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
        """(output [B, T, D], router stats). `token_mask_BT` (True = a real token) only decides which
        tokens `counts_E` counts (padding is routed like any token but not counted); None = all real."""
        cfg = self.config
        B, T, D = x_BTD.shape
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        pdtype, dtype = cfg.jnp_param_dtype, cfg.jnp_dtype
        normal = nn.initializers.normal(cfg.init_std)

        router_DE = param_with_axes(self, "router", normal, (D, E), ("embed", "router_exp"), jnp.float32)
        bias_E = self.variable(
            EXPERT_BIAS, BIAS, nn.with_logical_partitioning(jnp.zeros, ("router_exp",)), (E,), jnp.float32
        ).value
        experts = ExpertWeights(
            param_with_axes(self, "gate_proj", normal, (E, D, F), ("exp", "embed_moe", "mlp_moe"), pdtype),
            param_with_axes(self, "up_proj", normal, (E, D, F), ("exp", "embed_moe", "mlp_moe"), pdtype),
            param_with_axes(self, "down_proj", normal, (E, F, D), ("exp", "mlp_moe", "embed_moe"), pdtype),
        )

        # [B, T] stays unmerged up to the per-shard dispatch: under GSPMD a merged B * T could not keep
        # the sequence split over context (every device would route and dispatch its whole rows).
        logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))
        ids_BTk, weights_BTk = route(
            logits_BTE,
            bias_E,
            top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
            impl=cfg.router_impl,
        )
        experts = ExpertWeights(*(w.astype(dtype) for w in experts))
        # The choice follows the devices the step is traced for (a TPU topology mesh on a CPU host: TPU's),
        # the compute dtype and the FP8 mode (`select_moe_impl`; the planner makes the same call).
        fp8 = fp8_impl(cfg.fp8)
        impl = warn_fallback(select_moe_impl(cfg, kernel_target()))
        y_BTD, dropped = routed_experts(
            x_BTD.astype(dtype),
            ids_BTk,
            weights_BTk,
            experts,
            impl=impl,
            capacity_factor=cfg.expert_capacity_factor,
            fp8_impl=fp8,
        )
        if cfg.num_shared_experts:
            y_BTD = y_BTD + MLP(cfg, cfg.shared_intermediate_size, name="shared_experts")(x_BTD)
        stats = RouterStats(
            counts_E=expert_counts(ids_BTk, E, token_mask_BT),
            logits_BTE=logits_BTE,
            ids_BTk=ids_BTk,
            weights_BTk=weights_BTk,
            dropped=dropped,
        )
        return checkpoint_name(y_BTD, "moe_out"), stats
