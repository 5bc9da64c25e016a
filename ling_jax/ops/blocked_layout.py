"""The blocked row layout shared by the "blocked" grouped-GEMM dispatch (dispatch_blocked.py) and its
FP8 form (dispatch_blocked_fp8.py), and the small helpers both loops use.

Axis letters (besides the glossary in ling_jax/layers/__init__.py):
  M  assignments, N * k (token n's j-th expert is assignment n * k + j)
  R  padded rows, Q * b      Q  row blocks      b  rows per block (`block_size`)

The M assignments are placed in expert-sorted order into a row buffer in which every expert's group
starts on a block boundary (its rows are padded up to a multiple of b). Every block then belongs to
exactly one expert, so a grouped GEMM over fixed-size row blocks multiplies block q's b rows by the
weights of expert `block_expert_Q[q]`. Nothing is ever dropped, and the number of blocks has a STATIC
bound (so shapes are static under jit):

    sum_e ceil(c_e / b) <= (M + E' * (b - 1)) / b,   E' = min(E, M) experts that can be non-empty,

i.e. at most E' * (b - 1) padding rows on top of the M useful ones, versus N * E rows for per-expert
buffers of the naive dropless capacity C = N. Ids outside [0, E) mean "no assignment": they take no row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ling_jax.ops.expert_sort import sort_order

MIN_AUTO_BLOCK, MAX_AUTO_BLOCK = 8, 256


class BlockLayout(NamedTuple):
    """Where every assignment lives in the blocked row buffer (all int32, no gradients).

    pos_M:           row of each assignment; R for an invalid (out-of-range id) assignment.
    row_token_R:     token of each row; N for a padding row.
    row_assign_R:    assignment of each row; M for a padding row.
    block_expert_Q:  expert of each block (monotone; blocks past the used ones repeat the last expert).
    num_used_blocks: [] number of blocks that hold at least one row of some expert (the rest are skipped).
    """

    pos_M: jax.Array
    row_token_R: jax.Array
    row_assign_R: jax.Array
    block_expert_Q: jax.Array
    num_used_blocks: jax.Array


def max_blocks(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Static bound on the blocks any routing of `num_assignments` assignments can need (>= 1)."""
    nonempty = min(num_experts, num_assignments)
    return max(1, (num_assignments + nonempty * (block_size - 1)) // block_size)


def auto_block_size(num_assignments: int, num_experts: int) -> int:
    """The largest power of two <= half the mean rows per expert, clipped to [8, 256].

    Padding costs on average b / 2 rows per non-empty expert (<= 1/4 of the mean load with this
    rule, and <= 1/8 once the 256 cap applies), while larger blocks run more efficient matmuls and
    fewer loop steps (measured: benchmarks/README.md, "The blocked dispatch").
    """
    mean_rows = num_assignments // max(1, num_experts)
    b = MAX_AUTO_BLOCK
    while b > MIN_AUTO_BLOCK and 2 * b > mean_rows:
        b //= 2
    return b


def blocked_layout(ids_Nk: jax.Array, num_experts: int, block_size: int) -> BlockLayout:
    """Expert-sorted, block-aligned placement of the assignments `ids_Nk` (see module docstring)."""
    N, k = ids_Nk.shape
    M, E, b = N * k, num_experts, block_size
    Q = max_blocks(M, E, b)
    R = Q * b
    ids_M = ids_Nk.reshape(M).astype(jnp.int32)
    valid_M = (ids_M >= 0) & (ids_M < E)
    key_M = jnp.where(valid_M, ids_M, E)  # invalid assignments sort after every expert
    order_M = sort_order(key_M, E)  # sorted slot -> assignment (a stable sort)
    counts_E = jnp.zeros((E + 1,), jnp.int32).at[key_M].add(1)[:E]
    padded_E = (counts_E + b - 1) // b * b
    padded_end_E = jnp.cumsum(padded_E)
    padded_start_E = padded_end_E - padded_E
    start_E = jnp.cumsum(counts_E) - counts_E
    sorted_key_M = key_M[order_M]
    sorted_expert_M = jnp.minimum(sorted_key_M, E - 1)
    sorted_row_M = padded_start_E[sorted_expert_M] + jnp.arange(M, dtype=jnp.int32) - start_E[sorted_expert_M]
    sorted_row_M = jnp.where(sorted_key_M < E, sorted_row_M, R)
    pos_M = jnp.zeros((M,), jnp.int32).at[order_M].set(sorted_row_M)
    row_assign_R = jnp.full((R,), M, jnp.int32).at[sorted_row_M].set(order_M, mode="drop")
    row_token_R = jnp.where(row_assign_R < M, row_assign_R // k, N)
    block_start_Q = jnp.arange(Q, dtype=jnp.int32) * b
    block_expert_Q = jnp.minimum(jnp.searchsorted(padded_end_E, block_start_Q, side="right"), E - 1)
    num_used_blocks = padded_end_E[-1] // b
    return BlockLayout(pos_M, row_token_R, row_assign_R, block_expert_Q.astype(jnp.int32), num_used_blocks)


def take_rows(src_XD: jax.Array, idx_I: jax.Array) -> jax.Array:
    """src[idx] with zero rows for out-of-range indices."""
    return src_XD.at[idx_I].get(mode="fill", fill_value=0)


def zeros_varying(shape, dtype, vma: frozenset) -> jax.Array:
    """Zeros typed as varying along `vma`, so that loop carries and cond branches built from them
    type-check against values computed from the (varying) inputs under shard_map's check_vma."""
    z = jnp.zeros(shape, dtype)
    return lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def silu_and_grad(g):
    s = jax.nn.sigmoid(g)
    return g * s, s * (1 + g * (1 - s))


def block_inputs(layout: BlockLayout, block_size: int, row_weight_R, *per_row):
    """Per-block scan inputs: block index, expert, the rows' tokens and weights, then `per_row` arrays."""
    Q = layout.block_expert_Q.shape[0]
    blocked = (a.reshape(Q, block_size, *a.shape[1:]) for a in (layout.row_token_R, row_weight_R, *per_row))
    return (jnp.arange(Q, dtype=jnp.int32), layout.block_expert_Q, *blocked)


def row_weights(weights_Nk, layout: BlockLayout, dtype):
    """Routing weight of every row's assignment [R] (0 on padding rows)."""
    return take_rows(weights_Nk.reshape(-1), layout.row_assign_R).astype(dtype)
