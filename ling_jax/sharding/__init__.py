"""Device mesh (data / fsdp / expert / model) and the one logical-axis rules table."""

from ling_jax.sharding.mesh import MESH_AXES, build_mesh, resolve_mesh_shape
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES, batch_spec, logical_shardings

__all__ = ["MESH_AXES", "LOGICAL_AXIS_RULES", "batch_spec", "build_mesh", "logical_shardings", "resolve_mesh_shape"]
