"""The `jax.shard_map` typing of kernel calls and custom VJPs: varying axes, result structs, cotangents.

Inside `jax.shard_map` (check_vma=True, the default) every value carries the set of manual mesh axes it
varies along. A `pallas_call` or `ffi_call` must state that set for its results, and a custom VJP must
return cotangents typed like its primals. The Pallas kernels (pallas_kernels/), the compiled CPU kernel
(cpu_kernels/) and the pure-JAX grouped GEMMs (ling_jax/ops/) all need this, so it sits below all of
them and imports nothing of the project.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def varying_axes(*arrays) -> frozenset:
    """The manual mesh axes (inside `jax.shard_map`) along which any of `arrays` varies; empty outside."""
    types = [getattr(jax.typeof(x), "mat", None) for x in arrays]
    return frozenset().union(*(t.varying for t in types if t is not None))


def reduce_to_varying(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """Cotangent of `primal`: `ct` summed over the mesh axes it varies along but `primal` does not (the
    transpose of the implicit broadcast of an invariant input, as JAX's own VJPs do)."""
    extra = varying_axes(ct) - varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """`pallas_call` / `ffi_call` result type that varies over the mesh axes any of `inputs` varies over.

    Inside `jax.shard_map` (check_vma=True, the default) a kernel call must state how its outputs vary
    across the manual mesh axes; outside one the type is ignored. The struct carries the inputs' mesh
    (unsharded within the shard), which `ffi_call` needs beside the varying axes.
    """
    varying = varying_axes(*inputs)
    if not varying:
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = next(jax.typeof(x) for x in inputs if getattr(jax.typeof(x), "mat", None) is not None)
    return jax.ShapeDtypeStruct(
        shape,
        dtype,
        sharding=NamedSharding(aval.sharding.mesh, PartitionSpec()),
        manual_axis_type=type(aval.mat)(varying=varying),
    )
