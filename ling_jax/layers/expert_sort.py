"""The expert-sort permutation of MoE assignments: `jnp.argsort(keys, stable=True)` for small int keys.

The ragged and blocked dispatches order the M = N * k assignments by expert. A stable argsort is a
two-operand XLA sort (key and index, compared as a pair); for keys in [0, num_keys] the key and the
index fit one int32, key * M + index, whose plain sort gives the same permutation: the composite keys
are distinct and order first by key, then by index, as the stable argsort does.

Measured on the 2-core CPU host (2026-11-30, jax 0.10.2, median of 50 calls): M 8,192 (the bench
train shape's 2,048 tokens x top-4) 1.55 ms stable argsort vs 0.40 ms composite sort; M 65,536 (the
MoE-layer benchmark's 8,192 tokens x top-8) 14.4 vs 3.8 ms. When (num_keys + 1) * M does not fit an
int32 the stable argsort is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_INT32_LIMIT = 2**31


def sort_order(keys_M: jax.Array, num_keys: int) -> jax.Array:
    """int32 [M]: the permutation that sorts `keys_M` (ints in [0, num_keys]) stably, as
    `jnp.argsort(keys_M, stable=True)`. Keys outside that range are the caller's error (not checked:
    they are traced values)."""
    M = keys_M.shape[0]
    keys_M = keys_M.astype(jnp.int32)
    if (num_keys + 1) * M > _INT32_LIMIT:
        return jnp.argsort(keys_M, stable=True).astype(jnp.int32)
    composite_M = keys_M * M + jnp.arange(M, dtype=jnp.int32)
    return jnp.sort(composite_M) % M
