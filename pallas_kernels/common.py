"""What every kernel's wrapper shares: where the Pallas path runs, the one-time fallback warning, and
the `jax.shard_map` typing of kernel calls and custom VJPs (varying axes, result structs, cotangents)."""

from __future__ import annotations

import warnings

import jax
from jax.sharding import NamedSharding, PartitionSpec

_warned: set[tuple[str, str]] = set()


def resolve_interpret(interpret: bool | None, op: str) -> bool:
  """Interpret on CPU, compile on TPU (unless the config says); other backends have no Pallas path."""
  if interpret is not None:
    return interpret
  backend = jax.default_backend()
  if backend == "cpu":
    return True
  if backend == "tpu":
    return False
  raise NotImplementedError(f"the Pallas {op} has a TPU (Mosaic) path only; backend {backend!r} is not supported")


def warn_fallback_once(op: str, reason: str) -> None:
  """Warns once per (op, reason) that the Pallas kernel is unavailable and the XLA reference runs."""
  if (op, reason) not in _warned:
    _warned.add((op, reason))
    warnings.warn(f"{op}: Pallas kernel unavailable ({reason}); falling back to the XLA reference",
                  RuntimeWarning, stacklevel=4)


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
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(aval.sharding.mesh, PartitionSpec()),
                              manual_axis_type=type(aval.mat)(varying=varying))
