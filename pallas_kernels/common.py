"""What every kernel's wrapper shares: where the Pallas path runs, the one-time fallback warning, and
output structs typed for `jax.shard_map`."""

from __future__ import annotations

import warnings

import jax

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


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
  """`pallas_call` out_shape that varies over the mesh axes any of `inputs` varies over.

  Inside `jax.shard_map` (check_vma=True, the default) a pallas_call must state how its outputs vary
  across the manual mesh axes; outside one the type is ignored.
  """
  types = [getattr(jax.typeof(x), "mat", None) for x in inputs]
  types = [t for t in types if t is not None]
  if not types:
    return jax.ShapeDtypeStruct(shape, dtype)
  varying = frozenset().union(*(t.varying for t in types))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(types[0])(varying=varying))
