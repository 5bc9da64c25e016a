"""Per-shard routed-expert dispatch: what the MoE layer (ling_jax/layers/moe.py) runs under a mesh.

`per_shard_dispatch` wraps the dispatch in `jax.shard_map` so that every device sorts and dispatches
only its own tokens (split over the batch axes data / fsdp / expert, and for tokens passed as
[B, T, ...] the sequence over context). The shard_map specs come from the logical axis names through
the sharding rules table (`dispatch_axes`: tokens "activation_batch" and "activation_length",
experts "exp", expert width "mlp_moe"), so editing ling_jax/sharding/rules.py reaches them. Two cases:

- mesh axis "expert" > 1: expert parallelism, below (`expert_parallel_dispatch_with_stats`).
- otherwise every device holds all E experts: shard_map's in_specs ask for the full expert and
  model width, so weights sharded over fsdp ("embed_moe") are all-gathered at entry (their
  gradients reduced back on the way out), and the device runs `dispatch` on its n tokens.

In both, the experts' hidden width F may stay split over a `model_axis` ("mlp_moe" -> model):
tokens are replicated over that axis, each device computes its F-slice of every expert (SwiGLU is
elementwise in F, and the down projection sums over F) and the partial outputs are summed with one
`psum` over the axis: exact up to summation order, with 1/m of the weights and expert FLOPs.

Expert parallelism: routed experts sharded over a mesh axis, tokens exchanged with all-to-all.

Axis letters (besides the glossary in ling_jax/layers/__init__.py): P expert shards (size of the
expert mesh axis), El = E / P experts per shard, n tokens per device, C send-buffer rows per
destination shard, kl = min(k, El) expert slots a token can use on one shard.

Per device (inside `jax.shard_map`; tokens split over `token_axes`, experts over `expert_axis`):

 1. pack    for each destination shard p, the local tokens with at least one expert on p go, in token
            order, into a fixed-size buffer [P, C, D], with their expert ids local to p ([P, C, kl], -1
            for an unused slot) and routing weights [P, C, kl]. A token is sent to a shard once, however
            many of its k experts live there.
 2. send    `lax.all_to_all(..., tiled=True)` over the expert axis: device p receives [P, C, ...], one
            buffer from each source.
 3. compute the local experts on the P * C received tokens with the local dispatch (default "blocked":
            empty slots cost no rows; `local_impl` "dense" / "ragged" work too), each token's outputs
            already combined over its experts on this shard with the routing weights: [P * C, D].
 4. return  the reverse all-to-all; every token sums the partial outputs it gets back from the shards
            it was sent to.

Dropless by default: C = n, since one source can send at most all of its n tokens to one shard (e.g.
when every token routes all its experts there). Communication per device and direction is then
P * n * D values (fixed-size all-to-all; the buffers carry padding), the same as an all-gather of
the tokens over the expert axis, versus at most n * min(k, P) * D useful ones (with Ling's group-
limited routing and P = n_group, a token reaches at most topk_group shards). The local compute only
runs the rows actually received, but its static buffers are sized for P * C * kl assignments (the
blocked layout's [R, 2F] activations; "ragged" even computes every slot): 8x the n * k of a device
without expert parallelism at P = 8, k = 8. A dropless static bound cannot be smaller: every token of
the P sources may route all its experts to one shard.

`capacity_factor` (cf) trades that bound for drops, counted:
- send: C = min(n, ceil(cf * n * k / P)) tokens per destination; tokens beyond C for a destination are
  dropped there (their other shards still compute);
- receive: the received assignments are compacted, in arrival order (source shard, then token, then
  slot), into A = min(P * C * kl, P * ceil(cf * n * k / P)) single-expert rows, about cf times the
  n * k a device receives under balanced routing; the local dispatch runs on those A rows and the ones
  past A are dropped.
A `lax.ragged_all_to_all` exchange would send only the useful rows (its receive buffer still needs a
static bound); it is not used here because XLA:CPU, where this is tested, does not implement it.

Gradients (x, routing weights, expert weights) flow through the all-to-alls (their transpose is the
reverse all-to-all), the model-axis psum (x is replicated over that axis and meets F-sliced
weights, so shard_map sums x's partial gradients over it) and the local dispatch's own VJP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from ling_jax.ops.dispatch import ExpertWeights, dispatch
from ling_jax.sharding.rules import mesh_axes, single_mesh_axis

_NATIVE_EMPTY_SLOTS = ("blocked", "dense")  # local impls that treat an out-of-range id as "no expert"


class DispatchAxes(NamedTuple):
    """Mesh axes of the routed-expert shard_map, from the logical names through the rules table."""

    tokens: tuple[str, ...]  # "activation_batch": the tokens' dimension 0
    expert: str | None  # "exp": the experts (expert parallelism when its size is > 1)
    model: str | None  # "mlp_moe": the experts' hidden width F
    length: tuple[str, ...] = ()  # "activation_length": dimension 1 of tokens passed as [B, T, ...]


def dispatch_axes(mesh: Mesh | AbstractMesh, rules=None) -> DispatchAxes:
    """The mesh axes of `mesh` the rules (default: those in force, `ling_jax.sharding.rules.active_rules`)
    give the tokens, the experts and their width."""
    names = mesh.axis_names
    return DispatchAxes(
        mesh_axes("activation_batch", names, rules),
        single_mesh_axis("exp", names, rules),
        single_mesh_axis("mlp_moe", names, rules),
        mesh_axes("activation_length", names, rules),
    )


def shard_specs(
    token_axes: Sequence[str], expert_axis: str | None, model_axis: str | None, length_axes: Sequence[str] = ()
):
    """shard_map specs: tokens [N, ...] split over `token_axes` (or [B, T, ...], T also split over
    `length_axes`); gate / up [E, D, F] and down [E, F, D] with E over `expert_axis` and F over
    `model_axis` (None: whole)."""
    token_spec = PartitionSpec(tuple(token_axes), tuple(length_axes) or None)
    return token_spec, PartitionSpec(expert_axis, None, model_axis), PartitionSpec(expert_axis, model_axis, None)


class ExpertParallelOutput(NamedTuple):
    """y [N, D], and the number of (token, expert) assignments dropped for lack of capacity (int32 [],
    summed over all devices; always 0 when capacity_factor is None)."""

    y_ND: jax.Array
    dropped: jax.Array


def send_capacity(tokens_per_device: int, top_k: int, num_shards: int, capacity_factor: float | None) -> int:
    """Rows C of each per-destination send buffer: n (dropless) or min(n, ceil(cf * n * k / P))."""
    if capacity_factor is None:
        return tokens_per_device
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return max(1, min(tokens_per_device, math.ceil(capacity_factor * tokens_per_device * top_k / num_shards)))


def receive_capacity(
    tokens_per_device: int, top_k: int, num_shards: int, capacity_factor: float | None, send_rows: int, slots: int
) -> int:
    """Assignments A the local dispatch runs per device: every received slot, P * C * kl (dropless), or
    min(that, P * ceil(cf * n * k / P))."""
    received = num_shards * send_rows * slots
    if capacity_factor is None:
        return received
    return min(received, num_shards * math.ceil(capacity_factor * tokens_per_device * top_k / num_shards))


def _compact(ids_Mk, weights_Mk, capacity: int):
    """The first `capacity` valid (id >= 0) assignments of the received rows, in row-major order, as
    single-expert rows: received row [A] (M: none), id [A] (-1: none), weight [A], and how many valid
    assignments did not fit."""
    M, kl = ids_Mk.shape
    ids_Mkf, weights_Mkf = ids_Mk.reshape(-1), weights_Mk.reshape(-1)
    valid = ids_Mkf >= 0
    pos = jnp.cumsum(valid, dtype=jnp.int32) - 1
    keep = valid & (pos < capacity)
    slot = jnp.where(keep, pos, capacity)  # out of range: dropped by the scatters
    row = jnp.arange(M * kl, dtype=jnp.int32) // kl
    row_A = jnp.full((capacity,), M, jnp.int32).at[slot].set(row, mode="drop")
    ids_A = jnp.full((capacity,), -1, ids_Mk.dtype).at[slot].set(ids_Mkf, mode="drop")
    weights_A = jnp.zeros((capacity,), weights_Mk.dtype).at[slot].set(weights_Mkf, mode="drop")
    return row_A, ids_A, weights_A, jnp.sum(valid & ~keep, dtype=jnp.int32)


def _pack(x_nD, ids_nk, weights_nk, *, num_shards: int, experts_per_shard: int, capacity: int):
    """Send buffers for every destination shard (see module docstring, step 1).

    Returns x [P, C, D], local ids [P, C, kl] (-1: unused), weights [P, C, kl], the token of every
    buffer row [P, C] (n: unused row) and the number of dropped assignments.
    """
    n, k = ids_nk.shape
    P, El, C = num_shards, experts_per_shard, capacity
    kl = min(k, El)
    dest_nk = ids_nk // El
    hits_nkP = dest_nk[:, :, None] == jnp.arange(P, dtype=ids_nk.dtype)
    sent_nP = hits_nkP.any(axis=1)
    slot_nP = jnp.cumsum(sent_nP, axis=0, dtype=jnp.int32) - 1  # rank among the tokens sent to p
    kept_nP = sent_nP & (slot_nP < C)
    dropped = jnp.sum(hits_nkP & (sent_nP & ~kept_nP)[:, None, :], dtype=jnp.int32)
    # Row (p, c) <- token: an int scatter of n * P entries; unkept pairs land out of range and drop.
    token_n = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, P))
    shard_P = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None, :], (n, P))
    row_token_PC = jnp.full((P, C), n, jnp.int32).at[shard_P, jnp.where(kept_nP, slot_nP, C)].set(token_n, mode="drop")
    row_valid_PC = row_token_PC < n
    x_PCD = x_nD.at[row_token_PC].get(mode="fill", fill_value=0)
    ids_PCk = ids_nk.at[row_token_PC].get(mode="fill", fill_value=-1)
    weights_PCk = weights_nk.at[row_token_PC].get(mode="fill", fill_value=0)
    local_PCk = ids_PCk - (jnp.arange(P, dtype=ids_nk.dtype) * El)[:, None, None]
    here_PCk = row_valid_PC[:, :, None] & (local_PCk >= 0) & (local_PCk < El)
    if kl < k:  # a token has at most El distinct experts on a shard: keep the used slots, first kl
        order_PCk = jnp.argsort(~here_PCk, axis=-1, stable=True)[..., :kl]
        here_PCk = jnp.take_along_axis(here_PCk, order_PCk, axis=-1)
        local_PCk = jnp.take_along_axis(local_PCk, order_PCk, axis=-1)
        weights_PCk = jnp.take_along_axis(weights_PCk, order_PCk, axis=-1)
    local_PCk = jnp.where(here_PCk, local_PCk, -1).astype(jnp.int32)
    weights_PCk = jnp.where(here_PCk, weights_PCk, jnp.zeros_like(weights_PCk))
    return x_PCD, local_PCk, weights_PCk, row_token_PC, dropped


def _local_dispatch(
    x_MD, ids_Mk, weights_Mk, experts: ExpertWeights, impl: str, block_size: int | None, fp8_impl: str | None = None
):
    if impl not in _NATIVE_EMPTY_SLOTS:  # route empty slots to expert 0 with weight 0 (exact, wasteful)
        empty_Mk = ids_Mk < 0
        ids_Mk = jnp.where(empty_Mk, 0, ids_Mk)
        weights_Mk = jnp.where(empty_Mk, jnp.zeros_like(weights_Mk), weights_Mk)
    return dispatch(x_MD, ids_Mk, weights_Mk, experts, impl=impl, block_size=block_size, fp8_impl=fp8_impl)


def expert_parallel_dispatch_with_stats(
    x_ND: jax.Array,
    ids_Nk: jax.Array,
    weights_Nk: jax.Array,
    experts: ExpertWeights,
    *,
    mesh: Mesh | AbstractMesh,
    expert_axis: str | None = None,
    token_axes: Sequence[str] | None = None,
    local_impl: str = "blocked",
    block_size: int | None = None,
    capacity_factor: float | None = None,
    model_axis: str | None = None,
    fp8_impl: str | None = None,
    length_axes: Sequence[str] | None = None,
) -> ExpertParallelOutput:
    """Routed-expert output y [N, D] with experts sharded over `expert_axis` of `mesh`, plus the count
    of dropped assignments (see module docstring). Call under `jax.jit`; inputs are global arrays.

    Token arrays are split over the axes of `token_axes` present in `mesh` (dimension 0; they must
    include `expert_axis`; either left None comes from the rules table, `dispatch_axes`), the three
    expert weight arrays over `expert_axis` (dimension 0); mesh axes in neither are replicated
    (expert weights sharded elsewhere, e.g. over fsdp, are gathered by shard_map at entry). ids must
    lie in [0, E). Tokens may also come as [B, T, ...] (y [B, T, D]): B split over `token_axes`, T over
    `length_axes` (None: the rules' "activation_length", e.g. context), each device dispatching the
    tokens of its [B, T] block.

    `model_axis` (a mesh axis, or None): the experts' hidden width F stays split over it (gate / up
    [El, D, F / m], down [El, F / m, D]); tokens are replicated over it, every device computes its
    F-slice of each expert and the partial outputs are summed with one `psum` over `model_axis`
    (tensor parallelism inside the experts, exact up to summation order). `fp8_impl`: see `dispatch`.
    """
    axes = dispatch_axes(mesh)
    expert_axis = axes.expert if expert_axis is None else expert_axis
    token_axes = axes.tokens if token_axes is None else token_axes
    length_axes = axes.length if length_axes is None else length_axes
    if expert_axis not in mesh.axis_names:
        raise ValueError(f"expert_axis {expert_axis!r} is not an axis of the mesh {mesh.axis_names}")
    k = ids_Nk.shape[-1]
    E = experts.gate_EDF.shape[0]
    P = mesh.shape[expert_axis]
    if E % P:
        raise ValueError(f"{E} experts do not split evenly over expert axis {expert_axis!r} of size {P}")
    El = E // P
    tok_axes, len_axes, n = _split_axes(mesh, x_ND, token_axes, length_axes)
    if model_axis is not None and (model_axis not in mesh.axis_names or model_axis in tok_axes + len_axes):
        raise ValueError(
            f"model_axis {model_axis!r} must be a mesh axis {mesh.axis_names} outside {tok_axes + len_axes}"
        )
    if expert_axis not in tok_axes:
        raise ValueError(f"tokens must be split over the expert axis {expert_axis!r} too (token_axes {token_axes})")
    C = send_capacity(n, k, P, capacity_factor)
    A = receive_capacity(n, k, P, capacity_factor, C, min(k, El))

    def per_device(x, ids, weights, gate_EDF, up_EDF, down_EFD):
        x_nD, ids_nk, weights_nk = _flat_tokens(x, ids, weights)
        x_PCD, ids_PCk, w_PCk, row_token_PC, dropped = _pack(
            x_nD, ids_nk, weights_nk, num_shards=P, experts_per_shard=El, capacity=C
        )
        exchange = lambda a: lax.all_to_all(a, expert_axis, 0, 0, tiled=True)  # noqa: E731
        x_PCD, ids_PCk, w_PCk = exchange(x_PCD), exchange(ids_PCk), exchange(w_PCk)
        kl = ids_PCk.shape[-1]
        x_MD, ids_Mk, w_Mk = x_PCD.reshape(P * C, -1), ids_PCk.reshape(P * C, kl), w_PCk.reshape(P * C, kl)
        local = ExpertWeights(gate_EDF, up_EDF, down_EFD)
        if A < P * C * kl:  # compact the received assignments into A single-expert rows
            row_A, ids_A, w_A, dropped_here = _compact(ids_Mk, w_Mk, A)
            x_AD = x_MD.at[row_A].get(mode="fill", fill_value=0)
            y_AD = _local_dispatch(x_AD, ids_A[:, None], w_A[:, None], local, local_impl, block_size, fp8_impl)
            y_MD = jnp.zeros_like(y_AD, shape=x_MD.shape).at[row_A].add(y_AD, mode="drop")
            dropped = dropped + dropped_here
        else:
            y_MD = _local_dispatch(x_MD, ids_Mk, w_Mk, local, local_impl, block_size, fp8_impl)
        y_PCD = exchange(y_MD.reshape(P, C, -1))
        y_nD = jnp.zeros_like(x_nD).at[row_token_PC].add(y_PCD.astype(x_nD.dtype), mode="drop")
        if model_axis is not None:  # each device holds its F-slice's share of every output
            y_nD = lax.psum(y_nD, model_axis)
        return y_nD.reshape(x.shape), lax.psum(dropped, tok_axes + len_axes)

    token_spec, in_EDF, out_EFD = shard_specs(tok_axes, expert_axis, model_axis, len_axes)
    y_ND, dropped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, in_EDF, in_EDF, out_EFD),
        out_specs=(token_spec, PartitionSpec()),
    )(x_ND, ids_Nk, weights_Nk, *experts)
    return ExpertParallelOutput(y_ND, dropped)


def token_shards(mesh: Mesh | AbstractMesh, token_axes: Sequence[str] | None = None) -> int:
    """How many ways `mesh` splits the tokens: the product of its `token_axes` sizes (None: the rules'
    "activation_batch" axes; 1 without a mesh)."""
    if mesh.empty:
        return 1
    token_axes = dispatch_axes(mesh).tokens if token_axes is None else token_axes
    return math.prod(mesh.shape[a] for a in token_axes if a in mesh.axis_names) if not mesh.empty else 1


def _check_token_split(num_tokens: int, shards: int, tok_axes: tuple[str, ...]) -> None:
    if num_tokens % shards:
        raise ValueError(f"{num_tokens} tokens do not split evenly over token axes {tok_axes} ({shards} shards)")


def _split_axes(mesh, x, token_axes, length_axes) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(token axes, length axes, tokens per device) for token arrays [N, ...] or [B, T, ...] (T split
    over `length_axes` too); ValueError when a dimension does not split evenly."""
    names = mesh.axis_names
    tok_axes = tuple(a for a in token_axes if a in names)
    len_axes = tuple(a for a in length_axes if a in names) if x.ndim == 3 else ()
    _check_token_split(x.shape[0], token_shards(mesh, tok_axes), tok_axes)
    length_shards = math.prod(mesh.shape[a] for a in len_axes)
    if len_axes and x.shape[1] % length_shards:
        raise ValueError(
            f"sequence length {x.shape[1]} does not split evenly over length axes {len_axes} ({length_shards} shards)"
        )
    return tok_axes, len_axes, math.prod(x.shape[:-1]) // (token_shards(mesh, tok_axes) * length_shards)


def _flat_tokens(x, ids, weights):
    """Token arrays [..., D], [..., k], [..., k] as [n, D], [n, k], [n, k]."""
    return x.reshape(-1, x.shape[-1]), ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1])


def per_shard_dispatch(
    x_ND: jax.Array,
    ids_Nk: jax.Array,
    weights_Nk: jax.Array,
    experts: ExpertWeights,
    *,
    mesh: Mesh | AbstractMesh,
    impl: str,
    token_axes: Sequence[str] | None = None,
    expert_axis: str | None = None,
    model_axis: str | None = None,
    block_size: int | None = None,
    capacity_factor: float | None = None,
    fp8_impl: str | None = None,
    length_axes: Sequence[str] | None = None,
) -> ExpertParallelOutput:
    """y[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]) [N, D] and the dropped-assignment count,
    each device dispatching only its own tokens (`jax.shard_map`; call under `jax.jit`, inputs are
    global arrays).

    `token_axes`, `expert_axis`, `model_axis`, `length_axes` left None come from the rules table
    (`dispatch_axes`). Tokens are split over the `token_axes` present in `mesh`; tokens passed as
    [B, T, ...] (y [B, T, D]) have T split over `length_axes` too, so a sequence split over the
    context axis is dispatched where it lies. With `expert_axis` of size > 1 the
    experts are split over it and exchanged with all-to-all (`expert_parallel_dispatch_with_stats`,
    local dispatch `impl`); otherwise every device holds all E experts (shard_map gathers weights
    sharded over token axes such as fsdp at entry) and runs `dispatch(..., impl=impl)` on its tokens.
    Either way the experts' width F stays split over `model_axis` when it is a mesh axis of size > 1
    (tokens are replicated over it; partial outputs are summed with `psum`). ids must lie in [0, E).
    `capacity_factor` applies to expert parallelism only (module docstring; None: dropless); without
    it nothing is dropped. `fp8_impl`: see `dispatch`.
    """
    axes = dispatch_axes(mesh)
    token_axes = axes.tokens if token_axes is None else token_axes
    expert_axis = axes.expert if expert_axis is None else expert_axis
    model_axis = axes.model if model_axis is None else model_axis
    length_axes = axes.length if length_axes is None else length_axes
    tok_axes, len_axes, _ = _split_axes(mesh, x_ND, token_axes, length_axes)
    use_model = model_axis in mesh.axis_names and mesh.shape[model_axis] > 1 and model_axis not in tok_axes + len_axes
    model = model_axis if use_model else None
    if expert_axis is not None and expert_axis in tok_axes and mesh.shape[expert_axis] > 1:
        return expert_parallel_dispatch_with_stats(
            x_ND,
            ids_Nk,
            weights_Nk,
            experts,
            mesh=mesh,
            expert_axis=expert_axis,
            token_axes=tok_axes,
            local_impl=impl,
            block_size=block_size,
            capacity_factor=capacity_factor,
            model_axis=model,
            fp8_impl=fp8_impl,
            length_axes=len_axes,
        )

    def per_device(x, ids, weights, gate_EDF, up_EDF, down_EFD):
        x_nD, ids_nk, weights_nk = _flat_tokens(x, ids, weights)
        y_nD = dispatch(
            x_nD,
            ids_nk,
            weights_nk,
            ExpertWeights(gate_EDF, up_EDF, down_EFD),
            impl=impl,
            block_size=block_size,
            fp8_impl=fp8_impl,
        )
        y_nD = lax.psum(y_nD, model) if model is not None else y_nD
        return y_nD.reshape(x.shape)

    token_spec, in_EDF, out_EFD = shard_specs(tok_axes, None, model, len_axes)
    y_ND = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, in_EDF, in_EDF, out_EFD),
        out_specs=token_spec,
    )(x_ND, ids_Nk, weights_Nk, *experts)
    return ExpertParallelOutput(y_ND, jnp.zeros((), jnp.int32))
