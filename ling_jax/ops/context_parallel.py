"""Context parallelism for causal self-attention: the sequence split over the mesh axis the rules
table gives "activation_length" (`context`, config key mesh.context), with the causal work balanced.

Outside attention every layer is per token, so the model runs on its own [B, T] order with T split
into C contiguous pieces (device c holds slots [c T/C, (c+1) T/C)); RoPE positions, the mask's
slot indices, the loss and MTP's shifted ids therefore all stay in the original order. Only the
attention core, inside one `jax.shard_map`, sees other devices' tokens:

1. K / V (and their segment ids and slots) are all-gathered over `context` (every device then holds
   all S = T keys; an all-gather, not a ring: simpler, and the gathered K / V are the size of one
   device's queries times C / G, G query heads per kv head).
2. Load balance. Under a causal mask the last piece of the sequence sees C times the keys of the
   first. The queries are cut into 2C chunks of T / 2C and regrouped so that device i computes
   chunks i and 2C-1-i ("zigzag"): an early and a late chunk, the same causal work on every device.
   The regrouping is two `ppermute`s (each device sends its even chunk along one and its odd chunk
   along the other, both permutations), and two more bring the outputs back to the contiguous
   layout; segment ids and slots of the queries travel the same way.
3. Each device attends its two chunks to the gathered keys:
   - "xla": the early chunk (slots < T/2) against the first T/2 keys only, the late chunk against
     all T: 3/4 of the score work of attending both chunks to every key, on every device.
   - "splash": the kernel over the whole [T, T] causal mask with its rows in zigzag order and
     `q_seq_shards` = C; each device receives the mask blocks of its own rows, and blocks above the
     diagonal are skipped, so each device computes (2C+1) / (4C) of a full [T/C, T] block.

This assumes the keys are the queries' own slots (training / prefill without a cache) and slots
0..T-1 in order along the row, which `LingModel` passes without a cache. Gradients flow through the
collectives' transposes (all-gather -> reduce-scatter, ppermute -> inverse ppermute).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ling_jax.ops.attention_core import AttentionMask, dot_product_attention
from ling_jax.ops.attention_splash import run_kernel, splash_kernel
from ling_jax.sharding.rules import mesh_axes, single_mesh_axis


def context_axis(mesh) -> str | None:
    """The mesh axis the sequence is split over (the rules' "activation_length"), None when it is
    unsplit (no such axis, or size 1)."""
    if mesh is None or mesh.empty:
        return None
    axis = single_mesh_axis("activation_length", mesh.axis_names)
    return axis if axis is not None and mesh.shape[axis] > 1 else None


def zigzag_slots(T: int, C: int) -> np.ndarray:
    """Slot of each row in the zigzag order: device i's rows are chunks i then 2C-1-i of size T/2C."""
    chunk = T // (2 * C)
    order = [c for i in range(C) for c in (i, 2 * C - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order]).astype(np.int32)


def _zigzag_owner(chunk: int, C: int) -> int:
    return chunk if chunk < C else 2 * C - 1 - chunk


def to_zigzag(x, axis_name: str, C: int, seq_axis: int = 1):
    """Inside shard_map: this device's contiguous chunks (2c, 2c+1) -> its zigzag chunks (i, 2C-1-i)."""
    first, second = jnp.split(x, 2, axis=seq_axis)  # chunk 2c (even), chunk 2c+1 (odd)
    even = lax.ppermute(first, axis_name, [(c, _zigzag_owner(2 * c, C)) for c in range(C)])
    odd = lax.ppermute(second, axis_name, [(c, _zigzag_owner(2 * c + 1, C)) for c in range(C)])
    # Device i holds chunks i and 2C-1-i; i's parity says which of the two is the even one.
    i_even = lax.axis_index(axis_name) % 2 == 0
    return jnp.concatenate([jnp.where(i_even, even, odd), jnp.where(i_even, odd, even)], axis=seq_axis)


def from_zigzag(x, axis_name: str, C: int, seq_axis: int = 1):
    """The inverse of `to_zigzag`."""
    early, late = jnp.split(x, 2, axis=seq_axis)  # chunk i, chunk 2C-1-i
    i_even = lax.axis_index(axis_name) % 2 == 0
    even, odd = jnp.where(i_even, early, late), jnp.where(i_even, late, early)

    def even_chunk(i):
        return i if i % 2 == 0 else 2 * C - 1 - i

    def odd_chunk(i):
        return 2 * C - 1 - i if i % 2 == 0 else i

    first = lax.ppermute(even, axis_name, [(i, even_chunk(i) // 2) for i in range(C)])
    second = lax.ppermute(odd, axis_name, [(i, odd_chunk(i) // 2) for i in range(C)])
    return jnp.concatenate([first, second], axis=seq_axis)


def _head_axes(mesh, logical: str, num_heads: int) -> tuple[str, ...] | None:
    axes = tuple(a for a in mesh_axes(logical, mesh.axis_names) if mesh.shape[a] > 1)
    return axes if axes and num_heads % math.prod(mesh.shape[a] for a in axes) == 0 else None


def context_parallel_attention(q_BTHd, k_BTKd, v_BTKd, mask: AttentionMask, *, local_impl: str, interpret: bool):
    """Causal grouped-query self-attention [B, T, H, Dh] with T split over the context axis of the
    context mesh (`jax.sharding.get_abstract_mesh()`); `local_impl` is "xla" or "splash"."""
    mesh = jax.sharding.get_abstract_mesh()
    ctx = context_axis(mesh)
    if ctx is None:
        raise ValueError("context_parallel_attention needs a mesh whose 'activation_length' axis has size > 1")
    C = mesh.shape[ctx]
    B, T, H, Dh = q_BTHd.shape
    K = k_BTKd.shape[2]
    if T % (2 * C):
        raise ValueError(
            f"context parallelism over {ctx}={C} cuts the sequence into 2 x {C} chunks: the sequence length "
            f"(train.seq_len) {T} must be a multiple of {2 * C} (mesh.context x 2)"
        )
    batch = tuple(a for a in mesh_axes("activation_batch", mesh.axis_names) if mesh.shape[a] > 1)
    batch = batch if batch and B % math.prod(mesh.shape[a] for a in batch) == 0 else None
    # Heads stay split over `model` inside the shard_map when both head counts divide evenly.
    q_heads, kv_heads = _head_axes(mesh, "q_heads", H), _head_axes(mesh, "kv_heads", K)
    if q_heads is None or kv_heads is None or q_heads != kv_heads:
        q_heads = kv_heads = None
    q_spec, kv_spec, row_spec = P(batch, ctx, q_heads, None), P(batch, ctx, kv_heads, None), P(batch, ctx)
    local_heads = H // (math.prod(mesh.shape[a] for a in q_heads) if q_heads else 1)

    kernel = kernel_spec = None  # the splash kernel and its mask blocks' shard_map spec
    if local_impl == "splash":
        slots = zigzag_slots(T, C)
        kernel = splash_kernel(local_heads, T, T, query_slots=slots, q_shards=C, interpret=interpret)
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(None, ctx)))

    def local(q, k, v, q_seg, kv_seg, q_idx, kv_idx, *kernel):
        gather = lambda x: lax.all_gather(x, ctx, axis=1, tiled=True)  # noqa: E731
        k_all, v_all, kv_seg_all, kv_idx_all = gather(k), gather(v), gather(kv_seg), gather(kv_idx)
        zz = lambda x: to_zigzag(x, ctx, C)  # noqa: E731
        q, q_seg, q_idx = zz(q), zz(q_seg), zz(q_idx)
        if local_impl == "splash":
            out = run_kernel(kernel[0], q, k_all, v_all, q_seg, kv_seg_all)
        else:
            half, Tc = T // 2, q.shape[1] // 2
            outs = []
            for rows, keys in ((slice(0, Tc), slice(0, half)), (slice(Tc, 2 * Tc), slice(0, T))):
                m = AttentionMask(q_seg[:, rows], kv_seg_all[:, keys], q_idx[:, rows], kv_idx_all[:, keys])
                outs.append(dot_product_attention(q[:, rows], k_all[:, keys], v_all[:, keys], m.dense()))
            out = jnp.concatenate(outs, axis=1)
        return from_zigzag(out, ctx, C)

    extra, extra_specs = ((kernel,), (kernel_spec,)) if kernel is not None else ((), ())
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec, row_spec, *extra_specs),
        out_specs=q_spec,
        check_vma=False,  # pallas_call outputs carry no varying-axes type (platform notes)
    )(q_BTHd, k_BTKd, v_BTKd, mask.q_segment_BT, mask.kv_segment_BS, mask.q_index_BT, mask.kv_index_BS, *extra)
