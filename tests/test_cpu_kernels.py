"""The compiled CPU MoE kernel (cpu_kernels/moe_experts): built, exact, reproducible, clear errors.

Its values and gradients against the "dense" reference on every routing pattern are in
tests/test_dispatch.py (impl "cpu_kernel"); under expert-parallel and data-parallel meshes in
tests/test_expert_parallel.py and tests/test_moe_sharded.py.
"""

from __future__ import annotations

import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels.moe_experts import available, moe_experts, unavailable_reason
from ling_jax.ops.dispatch import ExpertWeights, dispatch

needs_kernel = pytest.mark.skipif(not available(), reason=str(unavailable_reason()))


def test_kernel_is_built_where_a_compiler_is():
    if not (sys.platform.startswith("linux") and shutil.which("g++")):
        pytest.skip("no C++ compiler: the install skips the kernel")
    assert available(), unavailable_reason()


def problem(N=50, D=24, F=16, E=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, D), np.float32))
    ids = jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32))
    ids = ids.at[::7, 0].set(1)  # one hot expert, several empty ones likely
    w = jnp.asarray(rng.uniform(0.1, 1.0, (N, k)).astype(np.float32))
    experts = ExpertWeights(
        *(jnp.asarray(rng.standard_normal(s, np.float32) * 0.3) for s in ((E, D, F), (E, D, F), (E, F, D)))
    )
    return x, ids, w, experts


def loss_and_grads(impl, x, ids, w, experts):
    ct = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    f = lambda x, w, ex: jnp.sum(dispatch(x, ids, w, ex, impl=impl) * ct)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, experts)


@needs_kernel
@pytest.mark.parametrize("N,E,k", [(1, 16, 2), (50, 12, 3), (64, 4, 4)])
def test_equals_dense_with_empty_experts(N, E, k):
    args = problem(N=N, E=E, k=k)
    got, want = loss_and_grads("cpu_kernel", *args), loss_and_grads("dense", *args)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-5)


@needs_kernel
def test_reproducible_bit_for_bit():
    args = problem(N=300, E=16, k=4)
    first, second = loss_and_grads("cpu_kernel", *args), loss_and_grads("cpu_kernel", *args)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_kernel
def test_bad_input_names_the_array():
    x, ids, w, (gate, up, down) = problem()
    with pytest.raises(ValueError, match=r"weights has shape \(50, 2\), expected \(50, 3\)"):
        moe_experts(x, ids, w[:, :2], gate, up, down)
    with pytest.raises(ValueError, match=r"down has shape"):
        moe_experts(x, ids, w, gate, up, down[:, :, :5])
    with pytest.raises(ValueError, match="x must be float32"):
        moe_experts(x.astype(jnp.bfloat16), ids, w, gate, up, down)
    with pytest.raises(ValueError, match="ids must be int32"):
        moe_experts(x, ids.astype(jnp.float32), w, gate, up, down)


def test_other_dtypes_run_blocked():
    x, ids, w, experts = problem()
    x16, ex16 = x.astype(jnp.bfloat16), ExpertWeights(*(a.astype(jnp.bfloat16) for a in experts))
    got = dispatch(x16, ids, w, ex16, impl="cpu_kernel")
    want = dispatch(x16, ids, w, ex16, impl="blocked")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@needs_kernel
def test_vmap_runs_per_element():
    x, ids, w, (gate, up, down) = problem(N=20)
    xs = jnp.stack([x, 2.0 * x, -x])
    got = jax.vmap(lambda x: moe_experts(x, ids, w, gate, up, down))(xs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(moe_experts(xs[i], ids, w, gate, up, down)))


def test_unbuilt_kernel_says_why(monkeypatch):
    import cpu_kernels.moe_experts as kernel_module

    monkeypatch.setattr(kernel_module, "unavailable_reason", lambda: "the extension was not built (test)")
    x, ids, w, experts = problem()
    with pytest.raises(RuntimeError, match="the extension was not built"):
        dispatch(x, ids, w, experts, impl="cpu_kernel")
