"""ling_jax.ops.grouped_matmul: equal to lax.ragged_dot, forward and both gradients.

On a Hopper GPU (run with JAX_PLATFORMS=cuda: tests/conftest.py defaults to cpu) the Mosaic-GPU kernels
run; they are compared with float32 lax.ragged_dot within one bf16 rounding (2^-7) relative to each row's
largest magnitude, since they accumulate in float32 and round once. Elsewhere grouped_matmul is
lax.ragged_dot itself (the same comparison holds) and the test checks which path is chosen.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.ops import grouped_matmul as gm

# M rows, K, N, group sizes (some empty, one ending in a partial tile).
CASES = [(1024, 256, 384, [0, 300, 5, 0, 519, 200]), (2048, 512, 128, [256] * 8 + [0] * 8)]


def _operands(m, k, n, sizes, dtype):
    kx, kw, ky = jax.random.split(jax.random.key(m + k + n), 3)
    lhs = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(kw, (len(sizes), k, n), jnp.float32) / k**0.5).astype(dtype)
    dout = jax.random.normal(ky, (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout


def _fwd_vjp(fn, lhs, rhs, sizes, dout):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
    return (out, *vjp(dout))


def _rowwise_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.max(np.abs(a - b) / (np.abs(b).max(axis=1, keepdims=True) + 1e-30)))


@pytest.mark.parametrize("m,k,n,sizes", CASES)
def test_grouped_matmul_equals_ragged_dot(m, k, n, sizes):
    dtype = jnp.bfloat16
    lhs, rhs, sizes_G, dout = _operands(m, k, n, sizes, dtype)
    got = jax.jit(lambda *a: _fwd_vjp(gm.grouped_matmul, *a))(lhs, rhs, sizes_G, dout)
    ref = jax.jit(lambda *a: _fwd_vjp(jax.lax.ragged_dot, *a))(
        *(x.astype(jnp.float32) for x in (lhs, rhs)), sizes_G, dout.astype(jnp.float32)
    )
    for name, g, r in zip(("out", "dlhs", "drhs"), got, ref):
        assert g.shape == r.shape, name
        assert _rowwise_rel(g, r) <= 2**-7, (name, _rowwise_rel(g, r))


def test_path_selection():
    lhs = jnp.zeros((256, 256), jnp.bfloat16)
    assert gm.mgpu_supported(lhs, jnp.zeros((4, 256, 128), jnp.bfloat16)) == gm.is_hopper()
    assert not gm.mgpu_supported(lhs, jnp.zeros((4, 256, 100), jnp.bfloat16))  # N not tile-aligned
    assert not gm.mgpu_supported(lhs.astype(jnp.float32), jnp.zeros((4, 256, 128), jnp.float32))


@pytest.mark.skipif(not gm.is_hopper(), reason="the Mosaic-GPU kernels need a Hopper GPU")
def test_mgpu_path_is_taken_on_hopper():
    lhs, rhs, sizes_G, _ = _operands(*CASES[0][:3], CASES[0][3], jnp.bfloat16)
    hlo = jax.jit(gm.grouped_matmul).lower(lhs, rhs, sizes_G).as_text()
    assert "mosaic_gpu" in hlo.lower(), hlo[:2000]
