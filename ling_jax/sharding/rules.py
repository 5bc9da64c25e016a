"""The one table that maps logical axis names (on every parameter and at block-boundary
activations) to mesh axes. Changing parallelism means changing this table, not the model.

- Batch is split over data, fsdp and expert: every device holds distinct tokens.
- Weights are split along their model width ("embed") over fsdp (ZeRO-3 style; gathered per layer).
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
    ("activation_length", None),
    ("activation_embed", None),
    # parameters
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("embed_concat", "fsdp"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("exp", "expert"),
    ("embed_moe", "fsdp"),
    ("mlp_moe", "model"),
    ("router_exp", None),
    ("norm", None),
    ("layers", None),
)


def batch_spec() -> PartitionSpec:
    """[B, T] input arrays: batch over (data, fsdp, expert), time unsplit."""
    return PartitionSpec(BATCH_AXES, None)


def logical_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a pytree of logical PartitionSpecs (e.g. from `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
