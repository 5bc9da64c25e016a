"""Token-to-expert dispatch: every implementation computes, for each token n,

    y[n] = sum_k weights[n, k] * expert_{ids[n, k]}(x[n]),   expert_e(x) = down_e(silu(gate_e x) * up_e x)

and all are exactly equal to float tolerance. Dropless: no token is ever dropped.

- "dense": every expert on every token, combined with a one-hot weight matrix. The plain reference
  (E / k times the useful FLOPs); tests compare every other path with it.
- "ragged": sort the N*k assignments by expert and run grouped matmuls with `jax.lax.ragged_dot`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertWeights(NamedTuple):
    gate_EDF: jax.Array
    up_EDF: jax.Array
    down_EFD: jax.Array


def _swiglu(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def dispatch_dense(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights) -> jax.Array:
    E = experts.gate_EDF.shape[0]
    h_NEF = _swiglu(
        jnp.einsum("ND,EDF->NEF", x_ND, experts.gate_EDF), jnp.einsum("ND,EDF->NEF", x_ND, experts.up_EDF)
    )
    out_NED = jnp.einsum("NEF,EFD->NED", h_NEF, experts.down_EFD)
    combine_NE = jnp.einsum("NkE,Nk->NE", jax.nn.one_hot(ids_Nk, E, dtype=jnp.float32), weights_Nk)
    return jnp.einsum("NE,NED->ND", combine_NE.astype(out_NED.dtype), out_NED)


def _sort_by_expert(ids_Nk):
    """Assignments sorted by expert (stable): (token of each sorted assignment, the sort order, flat ids)."""
    N, k = ids_Nk.shape
    flat_ids = ids_Nk.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    return order // k, order, flat_ids


def dispatch_ragged(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights) -> jax.Array:
    N, k = ids_Nk.shape
    E = experts.gate_EDF.shape[0]
    token_of, order, flat_ids = _sort_by_expert(ids_Nk)
    group_sizes_E = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    xs_MD = x_ND[token_of]
    h_MF = _swiglu(
        jax.lax.ragged_dot(xs_MD, experts.gate_EDF, group_sizes_E),
        jax.lax.ragged_dot(xs_MD, experts.up_EDF, group_sizes_E),
    )
    out_MD = jax.lax.ragged_dot(h_MF, experts.down_EFD, group_sizes_E)
    out_NkD = jnp.zeros_like(out_MD).at[order].set(out_MD).reshape(N, k, -1)
    return jnp.einsum("NkD,Nk->ND", out_NkD, weights_Nk.astype(out_NkD.dtype))


DISPATCHERS = {"dense": dispatch_dense, "ragged": dispatch_ragged}


def dispatch(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights, *, impl: str) -> jax.Array:
    if impl not in DISPATCHERS:
        raise ValueError(f"moe_dispatch {impl!r} is not one of {sorted(DISPATCHERS)}")
    return DISPATCHERS[impl](x_ND, ids_Nk, weights_Nk, experts)
