"""The attention core: softmax(q k^T / sqrt(Dh) masked) v for grouped-query heads, with causal query chunks.

Axis letters: B batch, T queries, S keys, K kv heads, G query heads per kv head (H = K * G), d head dim;
Tc queries of one chunk, Sc = the keys that chunk can see.

    out[b, t, k*G + g] = sum_s softmax_s(q[b, t, k, g] . k[b, s, k] / sqrt(d), masked) v[b, s, k]

Order of operations (all float32 after the score matmul): raw scores, mask (masked scores take the
float32 minimum), row max m, p = exp((s - m) / sqrt(d)), l = sum_s p, out = (p v) / l. The 1/sqrt(d)
scale rides in the exp pass and the normalisation is applied to the [.., d] output instead of the
[.., S] probabilities, so the [B, K, T, G, S] score array is traversed as few times as possible: on a
CPU this array, not the matmuls, is what attention costs. Scores are laid out [B, K, T, G, S] so
that both matmuls read q and write out in their natural [B, T, K, G, d] order (no transposed copy).

Causal query chunks (training and prefill without a cache, where the key slots are the query slots):
the T queries are cut into `query_chunks` chunks and chunk i only multiplies against the keys
[0, (i + 1) * Tc) it can see, skipping (n - 1) / (2n) of the score work; smaller score arrays also stay
in cache. Measured on the 2-core CPU host (B 8, T 256, 8/2 heads x 32, float32, forward + backward,
under load from other jobs): one chunk with the old layout and softmax ~66-110 ms, 8 chunks of 32
with this order of operations ~23 ms.

A query whose every key is masked gets the mean of the values of the keys it was given (uniform
weights), like a softmax over equal scores; the model never produces such rows (a token always sees
itself).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

MIN_CHUNK = 32  # queries per chunk below which the per-chunk overhead outweighs the skipped work
MAX_CHUNKS = 8  # chunks are unrolled: this bounds the program size


class AttentionMask(NamedTuple):
    """Which keys each query may see, kept as its [B, T] / [B, S] parts instead of a [B, T, S] array:

        allowed[b, t, s] = q_segment[b, t] == kv_segment[b, s]  and  kv_index[b, s] <= q_index[b, t]

    (same segment, not in the future; indices are slots, since packed documents restart their
    positions; segment 0 marks padding / empty cache slots). The XLA core materialises it per layer
    (`dense`); the splash and context-parallel paths take the parts (a [T, T] array per row would
    not fit at 128K tokens)."""

    q_segment_BT: jax.Array
    kv_segment_BS: jax.Array
    q_index_BT: jax.Array
    kv_index_BS: jax.Array

    def dense(self) -> jax.Array:
        """The [B, T, S] boolean mask."""
        same_segment = self.q_segment_BT[:, :, None] == self.kv_segment_BS[:, None, :]
        causal = self.kv_index_BS[:, None, :] <= self.q_index_BT[:, :, None]
        return same_segment & causal


def causal_query_chunks(num_queries: int) -> int:
    """Chunks for T causal queries: T // 32 up to 8, and a divisor of T (1 when none fits)."""
    n = max(1, min(MAX_CHUNKS, num_queries // MIN_CHUNK))
    while num_queries % n:
        n -= 1
    return n


def _attend(q_BTKGd, k_BSKd, v_BSKd, mask_BTS, scale: float) -> jax.Array:
    scores_BKTGS = jnp.einsum("BTKGd,BSKd->BKTGS", q_BTKGd, k_BSKd, preferred_element_type=jnp.float32)
    scores_BKTGS = jnp.where(mask_BTS[:, None, :, None, :], scores_BKTGS, jnp.finfo(jnp.float32).min)
    max_BKTG1 = jax.lax.stop_gradient(jnp.max(scores_BKTGS, axis=-1, keepdims=True))
    p_BKTGS = jnp.exp((scores_BKTGS - max_BKTG1) * scale)
    sum_BKTG1 = jnp.sum(p_BKTGS, axis=-1, keepdims=True)
    out_BKTGd = jnp.einsum(
        "BKTGS,BSKd->BKTGd", p_BKTGS.astype(v_BSKd.dtype), v_BSKd, preferred_element_type=jnp.float32
    )
    return (out_BKTGd / sum_BKTG1).astype(q_BTKGd.dtype).transpose(0, 2, 1, 3, 4)


def dot_product_attention(q_BTHd, k_BSKd, v_BSKd, mask_BTS, *, query_chunks: int = 1) -> jax.Array:
    """Grouped-query attention [B, T, H, d] (query head h uses kv head h // G).

    `query_chunks` > 1 assumes causal self-attention over the same slots (S == T, key s masked for every
    query t < s); it must divide T.
    """
    B, T, H, d = q_BTHd.shape
    S, K = k_BSKd.shape[1], k_BSKd.shape[2]
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if query_chunks < 1 or T % query_chunks or (query_chunks > 1 and S != T):
        raise ValueError(f"query_chunks={query_chunks} needs to divide T={T} and (when > 1) S == T, got S={S}")
    q_BTKGd = q_BTHd.reshape(B, T, K, H // K, d)
    scale = 1.0 / math.sqrt(d)
    Tc = T // query_chunks
    outs = []
    for i in range(query_chunks):
        Sc = S if query_chunks == 1 else (i + 1) * Tc
        outs.append(
            _attend(
                q_BTKGd[:, i * Tc : (i + 1) * Tc],
                k_BSKd[:, :Sc],
                v_BSKd[:, :Sc],
                mask_BTS[:, i * Tc : (i + 1) * Tc, :Sc],
                scale,
            )
        )
    out_BTKGd = outs[0] if query_chunks == 1 else jnp.concatenate(outs, axis=1)
    return out_BTKGd.reshape(B, T, H, d)
