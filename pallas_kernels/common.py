"""What every Pallas kernel's wrapper shares: where the Pallas path runs and the one-time fallback warning.

The `jax.shard_map` typing of kernel calls lives below every kernel package, in `shard_typing`."""

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
        warnings.warn(
            f"{op}: Pallas kernel unavailable ({reason}); falling back to the XLA reference",
            RuntimeWarning,
            stacklevel=4,
        )
