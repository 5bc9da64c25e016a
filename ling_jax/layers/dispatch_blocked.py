"""Blocked grouped-GEMM dispatch ("blocked"): the dropless MoE path that is fast where `ragged_dot` is not.

On CPU the compiled kernel of cpu_kernels/moe_experts.py ("cpu_kernel") is the default where it is
built (1.08x the dense floor at N 8192 against 1.33-1.48x for this path, benchmarks/README.md); this
pure-JAX path is its fallback and the FP8 path.

Axis letters (besides the glossary in ling_jax/layers/__init__.py):
  M  assignments, N * k (token n's j-th expert is assignment n * k + j)
  R  padded rows, Q * b      Q  row blocks      b  rows per block (`block_size`)

Layout. The M assignments are placed in expert-sorted order into a row buffer in which every expert's
group starts on a block boundary (its rows are padded up to a multiple of b). Every block then belongs
to exactly one expert, and the routed computation is a grouped GEMM over fixed-size row blocks: block q
multiplies its b rows by the [D, F] weights of expert `block_expert_Q[q]`. Nothing is ever dropped, and
the number of blocks has a STATIC bound (so shapes are static under jit):

    sum_e ceil(c_e / b) <= (M + E' * (b - 1)) / b,   E' = min(E, M) experts that can be non-empty,

i.e. at most E' * (b - 1) padding rows on top of the M useful ones, versus N * E rows for per-expert
buffers of the naive dropless capacity C = N.

Cost model (f = 6 * D * F, the FLOPs of one SwiGLU expert on one row):
  forward   M * f useful + padding rows (on average b / 2 per non-empty expert, at most b - 1);
            blocks past the used ones are skipped at run time (`lax.cond`), so the static bound
            costs memory, not FLOPs. gate and up run as one [b, D] x [D, 2F] matmul per block;
  backward  2x the forward FLOPs (dx and dW), from the pre-activations [g | u] saved by the forward
            ([R, 2F] rows, kept as the loop stacked them, the only row buffer); the routing-weight
            gradient <out, dy> = <h, dy down^T> reuses a matmul the backward needs anyway, so
            expert outputs are never stored;
  moves     per block, x / dy rows are gathered from token order and results are scatter-added back
            into a float32 [N, D] loop carry (in place); expert weights are read by dynamic index (no
            gathered [Q, D, F] copies); dW accumulates in place in a float32 [E, D, 2F] / [E, F, D]
            carry. No [M, D]-sized buffer is materialised.
  steps     blocks smaller than STEP_ROWS rows go P = STEP_ROWS // b to a loop step, as one batched
            matmul with the P blocks' weights gathered ([P, D, 2F], a small copy); see STEP_ROWS.

Measured on a 2-core CPU (N 8192, D 512, F 256, E 64, k 8, float32, forward + backward vs a dense
SwiGLU with the same activated FLOPs as plain 2-D matmuls): routed part alone 1.21x (b = 256)
single-threaded; the whole MoE layer (benchmarks/moe_layer.py) 1.25x single-threaded and 1.3-1.5x
with 2 threads (shared machine; 1.52-1.62x on the idle host on 2026-11-30, where the dense floor
gains more from the second core than the small per-block matmuls do). At N 1024 (128 rows per expert)
per-block overheads and the fixed E * D * F costs (gate|up concatenation, zeroing and writing the
weight gradients) weigh more: 2.1x for the layer (single-threaded); two separate gate / up matmuls per
block would save the concatenation there (measured 2.0x) but lose at N 8192 (1.30x instead of 1.25x
for the routed part).
Dropped alternatives: a batched einsum over blocks with gathered weights [Q, D, F] was 1.5-2x slower
than the scan (weight copies); writing block outputs to an [R, D] buffer and gathering them back
into token order cost ~0.1 s per [M, D] pass at this size (a plain 134 MB copy takes ~0.07 s on
this machine), more than the in-loop scatter-adds (~0.03 s).
Where the rest goes (2026-11-30, `jax.profiler` timeline of one backward step at N 8192, ~2.5 ms): the
four matmuls take ~66% at 185-275 GFLOP/s; the row gathers, weight slices, SiLU terms and the
scatter / weight-gradient updates run as small single-threaded fusions (20-90 us each) while the other
core waits. Tried and measured paired against this code in one process (time ratio, < 1 is faster), none
kept: gate|up concatenated per step instead of once per call 1.08; `down` transposed once per call for
dy @ down^T plus <h, dyW> as a matrix-vector product 1.02 (the matvec alone 1.02); 128-row blocks 1.10;
cutting each block to the first 1/4, 2/4, 3/4 or 4/4 of its rows that hold assignments (a `lax.switch`
inside the `lax.cond`; 10% fewer matmul rows here, 25% in the bench train step) 1.00 for the layer and
0.99 for the bench train step; the routing weight folded into h before the down projection 0.997
(bench train step); one fused [E, D, 2F] gate|up gradient carry with `down` transposed once per call
1.004 (bench train step); an optimization barrier so the backward's SiLU terms are computed once per
step 1.006; an expert-major loop (a scan over experts, each running a `fori_loop` over its own
blocks, so its weights are sliced once and its gradients accumulate in a small carry) 1.13; [g | u]
recomputed in the backward instead of saved 1.032 (bench train step); separate gate and up matmuls
per block instead of the per-call concatenation 1.043 (bench train step); the steps dealt alternately
to two independent loops (hoping XLA:CPU runs them on both cores at once) 1.090 (bench train step);
both loops unrolled 2x / 4x (`lax.scan(unroll=...)`) 1.018 / 1.012; x and dy given a zero row at
index N once per call, so that padding rows gather without the fill-mode select, 1.008 (bench train
step, 2026-11-30 10:00-10:15 UTC).
Per-expert [E, C] buffers as batched einsums with the rows past C through this loop (exact, dropless)
were 0.84-1.14x this path for the routed experts at N 8192, varying between identical compilations
with huge pages on (benchmarks/README.md, 2026-11-30 07:40 UTC). XLA:CPU pitfall: a
`lax.switch`, or nested `lax.cond`s, that thread the loop carries through their branches copy those
carries (the [E, D, F] gradients) on every step: 5.4x slower. Only the two-way `lax.cond` below
updates them in place.

FP8: with `fp8_impl` set, ling_jax/layers/dispatch_blocked_fp8.py runs the same layout and loop with
every expert GEMM (forward and backward) in blockwise FP8, weights quantized once per call.

Ids outside [0, E) mean "no assignment" (contributes nothing and costs no rows): expert parallelism
uses this for the slots of tokens routed to other shards. Second-order derivatives are not supported
(custom VJP).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ling_jax.layers.expert_sort import sort_order
from pallas_kernels.common import reduce_to_varying, varying_axes

MIN_AUTO_BLOCK, MAX_AUTO_BLOCK = 8, 256
# Rows per loop step: small blocks are grouped P = max(1, STEP_ROWS // b) to a step and multiplied as one
# batched matmul with their gathered [P, D, 2F] weights (fewer loop steps; XLA:CPU spreads the batched
# matmul over both cores). Measured paired on the 2-core host, bench train step (b = 128): P = 2 0.94x
# the step time of P = 1, P = 4 0.96x. STEP_ROWS 512 instead (2026-11-30 08:30 UTC): bench train step
# (P = 4) 0.999x, tiny 0.989x; at N 8192 (b = 256, P = 2) the routed experts alone 0.91-0.94x but the
# MoE layer (benchmarks/moe_layer.py's module, paired) 0.974x uniform and 1.012x skewed: no clear gain.
STEP_ROWS = 256


def blocks_per_step(block_size: int) -> int:
    return max(1, STEP_ROWS // block_size)


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
    fewer loop steps. Measured single-threaded (2-core CPU, D 512, F 256, E 64, routed part, fwd + bwd
    vs the dense floor): mean load 1024 rows, b = 64 / 128 / 256 / 512: 1.35 / 1.24 / 1.21 / 1.30x;
    mean load 128 rows, b = 16 / 32 / 64 / 128: 2.9 / 2.4 / 2.2 / 2.3x.
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


def _take_rows(src_XD: jax.Array, idx_I: jax.Array) -> jax.Array:
    """src[idx] with zero rows for out-of-range indices."""
    return src_XD.at[idx_I].get(mode="fill", fill_value=0)


def _zeros(shape, dtype, vma: frozenset) -> jax.Array:
    """Zeros typed as varying along `vma`, so that loop carries and cond branches built from them
    type-check against values computed from the (varying) inputs under shard_map's check_vma."""
    z = jnp.zeros(shape, dtype)
    return lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _silu_and_grad(g):
    s = jax.nn.sigmoid(g)
    return g * s, s * (1 + g * (1 - s))


def _block_inputs(layout: BlockLayout, block_size: int, row_weight_R, *per_row):
    """Per-block scan inputs: block index, expert, the rows' tokens and weights, then `per_row` arrays."""
    Q = layout.block_expert_Q.shape[0]
    blocked = (a.reshape(Q, block_size, *a.shape[1:]) for a in (layout.row_token_R, row_weight_R, *per_row))
    return (jnp.arange(Q, dtype=jnp.int32), layout.block_expert_Q, *blocked)


def _step_inputs(layout: BlockLayout, block_size: int, num_tokens: int, row_weight_R, *per_row):
    """Scan inputs, P = blocks_per_step(b) blocks a step: block indices [S, P], experts [S, P], the rows'
    tokens [S, P, b] and weights [S, P, b], then `per_row` arrays [S, P, b, ...]. The Q blocks are padded
    to S * P with empty blocks (index >= Q: past the used ones; tokens N: read as zeros, dropped on write;
    weight 0) of the last block's expert."""
    P = blocks_per_step(block_size)
    _, e_Q, token_Qb, *rest_Qb = _block_inputs(layout, block_size, row_weight_R, *per_row)
    Q = e_Q.shape[0]
    pad = -Q % P

    def steps(a, **pad_mode):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), **pad_mode)
        return a.reshape(a.shape[0] // P, P, *a.shape[1:])

    return (jnp.arange(Q + pad, dtype=jnp.int32).reshape(-1, P), steps(e_Q, mode="edge"),
            steps(token_Qb, constant_values=num_tokens), *(steps(a) for a in rest_Qb))


def _blocked_swiglu_fwd(x_ND, row_weight_R, fused, layout: BlockLayout, block_size: int):
    """y [N, D] (float32) = sum over rows r of weight_r * expert(x[token_r]), scatter-added per step,
    and the saved pre-activations [g | u] of every row, as the loop stacked them: [S, P, b, 2F] (kept
    in that shape for the backward's loop: no slicing and re-padding copies)."""
    gate_up_ED2F, down_EFD = fused
    P, b, F2 = blocks_per_step(block_size), block_size, gate_up_ED2F.shape[2]
    N, D = x_ND.shape
    vma = varying_axes(x_ND, row_weight_R, gate_up_ED2F, down_EFD, layout.row_token_R)

    def step(y_ND, inp):
        q_P, e_P, token_Pb, weight_Pb = inp

        def compute(y_ND):
            tokens = token_Pb.reshape(P * b)
            x_PbD = _take_rows(x_ND, tokens).reshape(P, b, D)
            gu_Pb2F = jnp.einsum("PbD,PDF->PbF", x_PbD, gate_up_ED2F[e_P])
            g_PbF, u_PbF = jnp.split(gu_Pb2F, 2, axis=-1)
            out_PbD = jnp.einsum("PbF,PFD->PbD", jax.nn.silu(g_PbF) * u_PbF, down_EFD[e_P])
            contrib = (out_PbD * weight_Pb[..., None]).reshape(P * b, D).astype(y_ND.dtype)
            return y_ND.at[tokens].add(contrib, mode="drop"), gu_Pb2F

        def skip(y_ND):
            return y_ND, _zeros((P, b, F2), x_ND.dtype, vma)

        return lax.cond(q_P[0] < layout.num_used_blocks, compute, skip, y_ND)

    return lax.scan(step, _zeros(x_ND.shape, jnp.float32, vma), _step_inputs(layout, b, N, row_weight_R))


def _blocked_swiglu_bwd(x_ND, dy_ND, row_weight_R, fused, layout: BlockLayout, block_size: int, gu_SPb2F):
    """Gradients of <y, dy>: dx [N, D], per-row routing-weight gradients [R], d gate, d up, d down, all
    accumulated in float32.

    Per block, dyW = dy @ down^T serves both the routing-weight gradient <out, dy> = <h, dyW> and
    dh = w * dyW, so the forward's expert outputs need not be kept. The weight gradients of a step's
    blocks are scatter-added by expert (two blocks of one expert add up).
    """
    gate_up_ED2F, down_EFD = fused
    P, b, F = blocks_per_step(block_size), block_size, down_EFD.shape[1]
    N, D = x_ND.shape
    R = layout.row_token_R.shape[0]
    f32 = jnp.float32
    vma = varying_axes(x_ND, dy_ND, row_weight_R, gate_up_ED2F, down_EFD, layout.row_token_R, gu_SPb2F)

    def step(carry, inp):
        q_P, e_P, token_Pb, weight_Pb, gu_Pb2F = inp

        def compute(carry):
            dx_ND, dgate_EDF, dup_EDF, ddown_EFD = carry
            tokens = token_Pb.reshape(P * b)
            x_PbD = _take_rows(x_ND, tokens).reshape(P, b, D)
            dy_PbD = _take_rows(dy_ND, tokens).reshape(P, b, D)
            g_PbF, u_PbF = jnp.split(gu_Pb2F, 2, axis=-1)
            a_PbF, dsilu_PbF = _silu_and_grad(g_PbF)
            h_PbF = a_PbF * u_PbF
            dyW_PbF = jnp.einsum("PbD,PFD->PbF", dy_PbD, down_EFD[e_P])
            dweight_Pb = jnp.sum((h_PbF * dyW_PbF).astype(f32), axis=-1)
            ddown_EFD = ddown_EFD.at[e_P].add(
                jnp.einsum("PbF,PbD->PFD", h_PbF * weight_Pb[..., None], dy_PbD, preferred_element_type=f32)
            )
            dh_PbF = dyW_PbF * weight_Pb[..., None]
            dgu_Pb2F = jnp.concatenate([dh_PbF * u_PbF * dsilu_PbF, dh_PbF * a_PbF], axis=-1)
            dgate_up_PD2F = jnp.einsum("PbD,PbF->PDF", x_PbD, dgu_Pb2F, preferred_element_type=f32)
            dgate_EDF = dgate_EDF.at[e_P].add(dgate_up_PD2F[..., :F])  # separate carries: no split copy
            dup_EDF = dup_EDF.at[e_P].add(dgate_up_PD2F[..., F:])
            dx_PbD = jnp.einsum("PbF,PDF->PbD", dgu_Pb2F, gate_up_ED2F[e_P])
            dx_ND = dx_ND.at[tokens].add(dx_PbD.reshape(P * b, D).astype(f32), mode="drop")
            return (dx_ND, dgate_EDF, dup_EDF, ddown_EFD), dweight_Pb

        def skip(carry):
            return carry, _zeros((P, b), f32, vma)

        return lax.cond(q_P[0] < layout.num_used_blocks, compute, skip, carry)

    E = down_EFD.shape[0]
    carry0 = tuple(_zeros(shape, f32, vma) for shape in (x_ND.shape, (E, D, F), (E, D, F), (E, F, D)))
    (dx_ND, dgate_EDF, dup_EDF, ddown_EFD), dweight_SPb = lax.scan(
        step, carry0, (*_step_inputs(layout, b, N, row_weight_R), gu_SPb2F)
    )
    return dx_ND, dweight_SPb.reshape(-1)[:R], dgate_EDF, dup_EDF, ddown_EFD


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocked_moe(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout: BlockLayout, block_size: int):
    return _blocked_moe_fwd(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout, block_size)[0]


def _row_weights(weights_Nk, layout: BlockLayout, dtype):
    """Routing weight of every row's assignment [R] (0 on padding rows)."""
    return _take_rows(weights_Nk.reshape(-1), layout.row_assign_R).astype(dtype)


def _blocked_moe_fwd(x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD, layout, block_size):
    # gate and up side by side: one [b, D] x [D, 2F] matmul per block instead of two narrower ones.
    fused = (jnp.concatenate([gate_EDF, up_EDF], axis=2), down_EFD)
    row_weight_R = _row_weights(weights_Nk, layout, x_ND.dtype)
    y_ND, gu_SPb2F = _blocked_swiglu_fwd(x_ND, row_weight_R, fused, layout, block_size)
    return y_ND.astype(x_ND.dtype), (x_ND, weights_Nk, fused, layout, gu_SPb2F)


def _blocked_moe_bwd(block_size, residuals, dy_ND):
    x_ND, weights_Nk, fused, layout, gu_SPb2F = residuals
    N, k = weights_Nk.shape
    row_weight_R = _row_weights(weights_Nk, layout, x_ND.dtype)
    dx_ND, dweight_R, dgate_EDF, dup_EDF, ddown_EFD = _blocked_swiglu_bwd(
        x_ND, dy_ND.astype(x_ND.dtype), row_weight_R, fused, layout, block_size, gu_SPb2F
    )
    dweights_Nk = _take_rows(dweight_R, layout.pos_M).reshape(N, k)
    wdtype = fused[1].dtype
    cts = (dx_ND.astype(x_ND.dtype), dweights_Nk.astype(weights_Nk.dtype), dgate_EDF.astype(wdtype),
           dup_EDF.astype(wdtype), ddown_EFD.astype(wdtype))
    # gate and up share their vma with the fused array they were concatenated into.
    primals = (x_ND, weights_Nk, fused[0], fused[0], fused[1])
    return (*(reduce_to_varying(ct, p) for ct, p in zip(cts, primals)), None)


_blocked_moe.defvjp(_blocked_moe_fwd, _blocked_moe_bwd)


def dispatch_blocked(
    x_ND, ids_Nk, weights_Nk, experts, *, block_size: int | None = None, fp8_impl: str | None = None
) -> jax.Array:
    """y[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]) as a grouped GEMM over row blocks.

    `experts` is an ExpertWeights (gate [E, D, F], up [E, D, F], down [E, F, D]). `block_size` None picks
    `auto_block_size`. Exact (equal to "dense" to float tolerance), dropless, differentiable in x,
    weights and expert weights.

    `fp8_impl` "xla" or "pallas" (a model's `fp8` mode; None or "off" = high precision) runs every expert
    GEMM, forward and backward, in blockwise FP8 (ling_jax/layers/dispatch_blocked_fp8.py); the block
    size is then a multiple of 128 (None: `auto_block_size` rounded up).
    """
    N, k = ids_Nk.shape
    E = experts[0].shape[0]
    fp8 = None if fp8_impl in (None, "off") else fp8_impl
    if fp8 is not None and fp8 not in ("xla", "pallas"):
        raise ValueError(f"fp8_impl must be None, 'off', 'xla' or 'pallas', got {fp8_impl!r}")
    if fp8 is not None:
        from ling_jax.layers import dispatch_blocked_fp8  # imports this module's helpers

        b = dispatch_blocked_fp8.fp8_block_size(auto_block_size(N * k, E), block_size)
    else:
        b = auto_block_size(N * k, E) if block_size is None else int(block_size)
    if b <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    dtype = jnp.result_type(x_ND, *experts)  # one compute dtype (a no-op when they already agree)
    layout = blocked_layout(ids_Nk, E, b)
    # jnp.asarray: numpy weights (e.g. from hf.load_checkpoint) must become jax arrays, since the block
    # loop indexes them with a traced expert id.
    args = (jnp.asarray(x_ND, dtype), jnp.asarray(weights_Nk), *(jnp.asarray(w, dtype) for w in experts), layout)
    if fp8 is not None:
        return dispatch_blocked_fp8.blocked_moe_fp8(*args, block_size=b, impl=fp8)
    return _blocked_moe(*args, b)
