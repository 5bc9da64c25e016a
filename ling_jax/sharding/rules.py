"""The one table that maps logical axis names (on every parameter and at block-boundary
activations) to mesh axes. Changing parallelism means changing this table, not the model.

- Batch is split over data, fsdp and expert, and the sequence ("activation_length") over context:
  every device holds distinct tokens. Attention gathers K / V over context and balances the causal
  work (ling_jax/ops/context_parallel.py); every other layer is per token.
- Weights are split along their model width ("embed") over fsdp and context (ZeRO-3 style; gathered
  per layer): context devices hold distinct tokens like fsdp devices, so they share the state too
  (as MaxText does) instead of holding replicas of it.
- Attention heads, FFN widths and the vocabulary go over model (tensor parallelism).
- Routed experts go over expert (expert parallelism); the router and its bias stay replicated.
"""

from __future__ import annotations

import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", "context"),
    ("activation_embed", None),
    # parameters
    ("vocab", "model"),
    ("embed", ("fsdp", "context")),
    ("embed_concat", ("fsdp", "context")),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("exp", "expert"),
    ("embed_moe", ("fsdp", "context")),
    ("mlp_moe", "model"),
    ("router_exp", None),
    ("norm", None),
    ("layers", None),
)


def active_rules() -> tuple:
    """The rules in force: flax's `nn.logical_axis_rules` context (the train and eval steps trace
    inside it), else LOGICAL_AXIS_RULES."""
    return tuple(nn.get_logical_axis_rules()) or LOGICAL_AXIS_RULES


def mesh_axes(logical: str, mesh_axis_names, rules=None) -> tuple[str, ...]:
    """The mesh axes that logical axis `logical` maps to under `rules` (default: `active_rules()`),
    keeping only those in `mesh_axis_names`: e.g. "activation_batch" -> ("data", "fsdp", "expert").
    shard_map specs are built from these, so editing the table reaches them. Raises KeyError for a
    logical name the rules do not list."""
    rules = active_rules() if rules is None else rules
    for name, value in rules:
        if name == logical:
            axes = () if value is None else (value,) if isinstance(value, str) else tuple(value)
            return tuple(a for a in axes if a in tuple(mesh_axis_names))
    raise KeyError(f"logical axis {logical!r} is not in the sharding rules ({[n for n, _ in rules]})")


def single_mesh_axis(logical: str, mesh_axis_names, rules=None) -> str | None:
    """The one mesh axis `logical` maps to (None: unsplit); ValueError when the rules split it over
    several, which the expert-parallel exchange and the expert-width psum do not support."""
    axes = mesh_axes(logical, mesh_axis_names, rules)
    if len(axes) > 1:
        raise ValueError(f"logical axis {logical!r} maps to several mesh axes {axes}; the routed experts need one")
    return axes[0] if axes else None


def batch_spec(rules=None) -> PartitionSpec:
    """[B, T] input arrays: batch over the mesh axes of "activation_batch" (data, fsdp, expert), time
    over those of "activation_length" (context)."""
    rules = active_rules() if rules is None else rules
    table = dict(rules)
    return PartitionSpec(table.get("activation_batch"), table.get("activation_length"))


def logical_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a pytree of logical PartitionSpecs (e.g. from `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
