"""Per-device bytes of the train state, read from the real rules table and abstract shapes.

Nothing here is a hand formula for parameter layout: the abstract `TrainState` (params, expert
biases, the optax AdamW state exactly as `make_optimizer` builds it) comes from
`ling_jax.train.state.state_shardings` over a `jax.sharding.AbstractMesh` with the planned axis
sizes, and every leaf's per-device shape is `NamedSharding.shard_shape` of its global shape, i.e.
what `jax.jit` would allocate. No device and no libtpu is needed.

Gradients are the parameters' shapes and dtypes (`jax.grad` of float32 params is float32) and
GSPMD keeps them sharded like the parameters, so their bytes per device equal the parameters'.
AdamW keeps mu in `mu_dtype` (None: the param dtype) and nu in the param dtype (optax 0.2.8
`scale_by_adam`), which the abstract state shows directly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from ling_jax.config import ConfigError
from ling_jax.sharding.mesh import MESH_AXES
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
from ling_jax.train.config import Experiment
from ling_jax.train.state import make_optimizer, state_shardings

STATE_GROUPS = ("params", "opt_state", "expert_bias")  # TrainState fields; the rest are scalars


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    path: str  # e.g. "params/moe_stack/layers/moe/gate_proj"
    group: str  # "params", "opt_state", "expert_bias" or "other"
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec  # mesh axes per dimension
    shard_shape: tuple[int, ...]

    @property
    def bytes_per_device(self) -> int:
        return math.prod(self.shard_shape) * np.dtype(self.dtype).itemsize

    @property
    def bytes_global(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class StatePlan:
    leaves: tuple[LeafPlan, ...]

    def bytes_per_device(self, group: str) -> int:
        return sum(leaf.bytes_per_device for leaf in self.leaves if leaf.group == group)

    @property
    def params_bytes(self) -> int:
        return self.bytes_per_device("params")

    @property
    def optimizer_bytes(self) -> int:
        return self.bytes_per_device("opt_state")

    @property
    def gradient_bytes(self) -> int:  # same shapes, dtypes and shardings as the params
        return self.params_bytes

    @property
    def other_bytes(self) -> int:  # expert biases and scalar counters
        return self.bytes_per_device("expert_bias") + self.bytes_per_device("other")

    def largest(self, n: int, groups=("params", "opt_state")) -> list[LeafPlan]:
        chosen = [leaf for leaf in self.leaves if leaf.group in groups]
        return sorted(chosen, key=lambda leaf: leaf.bytes_per_device, reverse=True)[:n]


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A device-free mesh with the MESH_AXES sizes (a missing axis: 1), Auto axes like build_mesh."""
    return AbstractMesh(
        tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def path_text(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The TrainState's leaves and mesh-axis PartitionSpecs from the rules table (mesh sizes
    do not change which axes a leaf maps to, so this is built once per config)."""

    leaves: tuple[tuple[str, str, tuple[int, ...], str, PartitionSpec], ...]  # path, group, shape, dtype, spec


def state_layout(exp: Experiment, rules=LOGICAL_AXIS_RULES) -> StateLayout:
    mesh = abstract_mesh({a: 1 for a in MESH_AXES})
    abstract, shardings = state_shardings(exp.model, make_optimizer(exp.train), mesh, rules)
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    flat_abstract = jax.tree_util.tree_flatten_with_path(abstract)[0]
    leaves = []
    for (path, leaf), sharding in zip(flat_abstract, flat_shardings, strict=True):
        text = path_text(path)
        group = text.split("/", 1)[0]
        leaves.append(
            (text, group if group in STATE_GROUPS else "other", tuple(leaf.shape), str(leaf.dtype), sharding.spec)
        )
    return StateLayout(tuple(leaves))


def plan_state(layout: StateLayout | Experiment, mesh_sizes: dict[str, int]) -> StatePlan:
    """Every TrainState leaf with its PartitionSpec and per-device shard shape on this mesh.

    Raises ConfigError naming the first leaf whose dimension the mesh cannot split evenly (jit
    would refuse the same sharding)."""
    if isinstance(layout, Experiment):
        layout = state_layout(layout)
    mesh = abstract_mesh(mesh_sizes)
    planned = []
    for path, group, shape, dtype, spec in layout.leaves:
        try:
            shard_shape = NamedSharding(mesh, spec).shard_shape(shape)
        except ValueError:
            shown = ", ".join(f"{a}={s}" for a, s in mesh_sizes.items())
            raise ConfigError(f"mesh ({shown}) cannot split {path} of shape {shape} as {spec}") from None
        planned.append(LeafPlan(path, group, shape, dtype, spec, tuple(shard_shape)))
    return StatePlan(tuple(planned))
