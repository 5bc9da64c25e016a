"""Causal self-attention through JAX's Pallas TPU splash attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`), with segment ids for packed rows and GQA.

The kernel works on one example, q [H, T, Dh] and k, v [K, S, Dh] with H a multiple of K (query
head h reads kv head h // (H / K), the grouping of attention_core); it is vmapped over the batch.
The mask is static (built in numpy at trace time, block-sparse: blocks above the diagonal are
skipped, not computed); segment ids are "and"-ed into it inside the kernel. The kernel applies no
1/sqrt(Dh) scale, so q is scaled first. On a CPU target the kernel runs in Pallas interpret mode
(tests compare it with the XLA core there); on TPU it lowers through Mosaic.

Limits (checked in `unsupported_reason`, named in the error): the query and key lengths must be
multiples of SPLASH_BLOCK (the kernel's block size divides both). Any head_dim lowers: an AOT
compile for v5p succeeded for head_dim 8, 40, 64, 96, 128 and 256 (128, every Ling size, fills
the 128 lanes exactly).

`query_slots` (optional, numpy [T]) gives the slot index of each query row when the rows are not
in order 0..T-1: the context-parallel path runs the kernel over a load-balanced row order
(ling_jax/ops/context_parallel.py) with `q_shards` = the context size, so each device holds the
mask blocks of its own rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from ling_jax.ops.pallas_target import per_row_shard

SPLASH_BLOCK = 128  # the smallest block the kernel takes (one 128-lane tile); lengths must be multiples
MAX_BLOCK = 512  # the largest block tried (fewer grid steps; fits VMEM at head_dim 128 in bf16)


def unsupported_reason(num_queries: int, num_keys: int) -> str | None:
    """Why the kernel cannot take T queries against S keys (None: it can)."""
    for name, n in (("query", num_queries), ("key", num_keys)):
        if n % SPLASH_BLOCK:
            return f"the splash kernel needs the {name} length to be a multiple of {SPLASH_BLOCK}, got {n}"
    return None


def block_size(num_queries: int, num_keys: int) -> int:
    """The largest power-of-two block in [SPLASH_BLOCK, MAX_BLOCK] dividing both lengths."""
    block = MAX_BLOCK
    while block > SPLASH_BLOCK and (num_queries % block or num_keys % block):
        block //= 2
    return block


class _SlotCausalMask(splash.CausalMask):
    """Causal mask whose row r is the query at slot `query_slots[r]` (keys in slot order)."""

    def __init__(self, shape, query_slots: np.ndarray, shard_count: int):
        super().__init__(shape, shard_count=shard_count)
        self.q_sequence = np.asarray(query_slots, np.int32)


def _kernel(num_heads: int, T: int, S: int, slots: tuple[int, ...] | None, q_shards: int, interpret: bool):
    if slots is None:
        head_mask = splash.CausalMask((T, S), shard_count=q_shards)
    else:
        head_mask = _SlotCausalMask((T, S), np.asarray(slots), q_shards)
    b = block_size(T // q_shards, S)
    sizes = splash.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    mask = splash.MultiHeadMask([head_mask] * num_heads)
    # Built anew per trace, never cached: the kernel holds its mask tables as arrays, and a kernel made
    # inside one trace (scan, remat, grad) carries that trace's tracers into the next one.
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=q_shards, interpret=interpret)


def splash_kernel(num_heads: int, T: int, S: int, *, query_slots=None, q_shards: int = 1, interpret: bool = False):
    """The kernel for H heads, T query rows (all shards together) and S keys."""
    why = unsupported_reason(T // q_shards, S)
    if why is not None:
        raise ValueError(f"model.attention_impl='splash': {why}")
    slots = None if query_slots is None else tuple(int(s) for s in np.asarray(query_slots))
    return _kernel(num_heads, T, S, slots, q_shards, interpret)


def run_kernel(kernel, q_BTHd, k_BSKd, v_BSKd, q_segment_BT, kv_segment_BS) -> jax.Array:
    """Calls a kernel from `splash_kernel` on [B, T, H, Dh] / [B, S, K, Dh] operands; [B, T, H, Dh] out."""
    scale = 1.0 / math.sqrt(q_BTHd.shape[-1])
    q_BHTd = (q_BTHd * jnp.asarray(scale, q_BTHd.dtype)).transpose(0, 2, 1, 3)
    k_BKSd, v_BKSd = k_BSKd.transpose(0, 2, 1, 3), v_BSKd.transpose(0, 2, 1, 3)

    def one(q_HTd, k_KSd, v_KSd, q_seg_T, kv_seg_S):
        return kernel(q_HTd, k_KSd, v_KSd, segment_ids=splash.SegmentIds(q_seg_T, kv_seg_S))

    out_BHTd = jax.vmap(one)(q_BHTd, k_BKSd, v_BKSd, q_segment_BT.astype(jnp.int32), kv_segment_BS.astype(jnp.int32))
    return out_BHTd.transpose(0, 2, 1, 3).astype(q_BTHd.dtype)


def splash_attention(q_BTHd, k_BSKd, v_BSKd, q_segment_BT, kv_segment_BS, *, interpret: bool) -> jax.Array:
    """Causal (slot s visible from slot t >= s) grouped-query self-attention within segments.

    GSPMD cannot partition a Mosaic call, so under a multi-device mesh each device runs its batch
    rows (`per_row_shard`: rows over the rules' "activation_batch" axes, heads whole)."""
    B, T, H, _ = q_BTHd.shape
    kernel = splash_kernel(H, T, k_BSKd.shape[1], interpret=interpret)
    return per_row_shard(
        lambda *rows: run_kernel(kernel, *rows), rows=(q_BTHd, k_BSKd, v_BSKd, q_segment_BT, kv_segment_BS)
    )
