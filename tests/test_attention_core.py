"""ling_jax.ops.attention_core: causal query chunks and the reordered softmax equal plain attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.layers.attention import attention_mask
from ling_jax.ops.attention_core import causal_query_chunks, dot_product_attention


def naive_attention(q_BTHd, k_BSKd, v_BSKd, mask_BTS):
    """Textbook GQA attention in float64 numpy: softmax(q k^T / sqrt(d) + mask) v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_BTHd, k_BSKd, v_BSKd))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = np.where(np.asarray(mask_BTS)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def packed_inputs(B=2, T=96, H=6, K=2, d=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, T, H, d)) * 3
    k = jax.random.normal(keys[1], (B, T, K, d))
    v = jax.random.normal(keys[2], (B, T, K, d))
    # two packed documents in row 0 and trailing padding (segment 0) in row 1
    seg = np.ones((B, T), np.int32)
    seg[0, T // 3 :] = 2
    seg[1, T - 10 :] = 0
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return q, k, v, attention_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(idx)).dense()


@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_matches_naive_attention(chunks):
    q, k, v, mask = packed_inputs()
    got = dot_product_attention(q, k, v, mask, query_chunks=chunks)
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_chunked_gradients_equal_unchunked():
    q, k, v, mask = packed_inputs(seed=1)
    dout = jax.random.normal(jax.random.key(9), q.shape)

    def grads(chunks):
        _, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask, query_chunks=chunks), q, k, v)
        return vjp(dout)

    for g1, g4 in zip(grads(1), grads(4)):
        np.testing.assert_allclose(np.asarray(g4), np.asarray(g1), rtol=1e-5, atol=1e-5)


def test_chunk_choice_and_validation():
    assert causal_query_chunks(256) == 8
    assert causal_query_chunks(128) == 4
    assert causal_query_chunks(40) == 1
    assert causal_query_chunks(96) == 3
    assert causal_query_chunks(4096) == 8
    assert causal_query_chunks(250) == 5  # the largest divisor of T not above T // 32
    q, k, v, mask = packed_inputs(T=96)
    with pytest.raises(ValueError, match="query_chunks"):
        dot_product_attention(q, k, v, mask, query_chunks=5)
    with pytest.raises(ValueError, match="query_chunks"):
        dot_product_attention(q, k[:, :48], v[:, :48], mask[:, :, :48], query_chunks=2)
