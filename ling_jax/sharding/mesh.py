"""Builds the device mesh (data, fsdp, expert, context, model) from the `mesh` config section.

`context` splits the sequence (context parallelism, ling_jax/ops/context_parallel.py); it sits
next to `model` so that on a TPU slice its devices are near neighbours for the K / V all-gather."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ling_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "context", "model")


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills the one -1 axis (if any) and checks that the product equals the device count."""
    fixed = math.prod(v for v in sizes.values() if v != -1)
    resolved = dict(sizes)
    for name, v in sizes.items():
        if v == -1:
            if num_devices % fixed:
                raise ConfigError(
                    f"mesh.{name}=-1: the other axes' product {fixed} does not divide the {num_devices} devices"
                )
            resolved[name] = num_devices // fixed
    product = math.prod(resolved.values())
    if product != num_devices:
        shown = ", ".join(f"mesh.{k}={v}" for k, v in resolved.items())
        raise ConfigError(f"mesh product {product} ({shown}) must equal the number of devices ({num_devices})")
    return resolved


def build_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes MESH_AXES, Auto axis types so logical sharding
    constraints apply inside jit. An axis missing from `sizes` (e.g. "context") has size 1."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"unknown mesh axis(es) {unknown}; the axes are {MESH_AXES}")
    shape = resolve_mesh_shape({k: sizes.get(k, 1) for k in MESH_AXES}, len(devices))
    if len(devices) > 1 and all(d.platform != "cpu" for d in devices):
        # allow_split_physical_axes: a logical axis (e.g. model=8 on a 16x16x16 slice) need not be a
        # product of whole physical axes; without it create_device_mesh raises NotImplementedError.
        device_array = jax.experimental.mesh_utils.create_device_mesh(
            tuple(shape.values()), devices, allow_split_physical_axes=True
        )
    else:
        device_array = np.asarray(devices, dtype=object).reshape(tuple(shape.values()))
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
