"""Routed experts in FP8 (the blocked dispatch with fp8_impl): forward and every gradient

- equal a per-expert composition of `blockwise_fp8_matmul` (x_e @ [gate_e | up_e], silu * up, then
  @ down_e; the same quantization recipe forward and backward) to float32 rounding;
- stay close to the high-precision blocked dispatch: relative Frobenius error < sqrt(2) * 5e-2,
  the FP8 matmul tests' single-GEMM bound for the two chained GEMMs of an expert (independent
  errors add in quadrature). Measured 6.0-6.6% on every output and gradient: four quantized
  operands on the path (x, gate|up, h, down; ~2.6% RMS each) plus the SwiGLU product of the two
  noisy halves, vs ~3.7% for one GEMM;
- give the same result with the Pallas kernel (interpret mode on CPU) as with the XLA GEMM.
Shapes have partial 128-tiles along D and F, a [D, 2F] gate|up block that straddles gate and up,
experts with more than one 128-row tile, and an empty expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.ops.dispatch import ExpertWeights
from ling_jax.ops.dispatch_blocked import dispatch_blocked
from ling_jax.ops.fp8 import fp8_impl
from pallas_kernels.fp8_matmul import blockwise_fp8_matmul

NAMES = ("y", "dx", "dweights", "dgate", "dup", "ddown")


def make_inputs(N=150, D=160, F=96, E=5, k=2, seed=0, skewed=False):
    kx, kw, ki, kg, ku, kd, kc = jax.random.split(jax.random.PRNGKey(seed), 7)
    x_ND = jax.random.normal(kx, (N, D))
    weights_Nk = jax.random.uniform(kw, (N, k), minval=0.1, maxval=1.0)
    # k distinct experts per token among the first E - 1 (the last expert stays empty).
    ids_Nk = jnp.argsort(jax.random.uniform(ki, (N, E - 1)), axis=1)[:, :k].astype(jnp.int32)
    if skewed:  # expert 0 in slot 0 of 3/4 of the tokens: > 128 rows, two row tiles
        hot = (jnp.arange(N) % 4 != 0) & ~(ids_Nk == 0).any(axis=1)
        ids_Nk = jnp.where(hot[:, None] & (jnp.arange(k) == 0), 0, ids_Nk)
    experts = ExpertWeights(
        jax.random.normal(kg, (E, D, F)) * D**-0.5,
        jax.random.normal(ku, (E, D, F)) * D**-0.5,
        jax.random.normal(kd, (E, F, D)) * F**-0.5,
    )
    ct_ND = jax.random.normal(kc, (N, D))
    return x_ND, ids_Nk, weights_Nk, experts, ct_ND


def fp8_reference(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights, impl="xla"):
    """Per expert (rows in assignment order): blockwise_fp8_matmul(x_e, [gate_e | up_e]) -> SwiGLU ->
    blockwise_fp8_matmul(h_e, down_e), weighted and summed into token order. `ids` must be concrete."""
    N, k = ids_Nk.shape
    flat_ids = np.asarray(ids_Nk).reshape(-1)
    flat_w = weights_Nk.reshape(-1)
    y_ND = jnp.zeros(x_ND.shape, jnp.float32)
    for e in range(experts.gate_EDF.shape[0]):
        assign = np.nonzero(flat_ids == e)[0]
        if assign.size == 0:
            continue
        tokens = assign // k
        gate_up_D2F = jnp.concatenate([experts.gate_EDF[e], experts.up_EDF[e]], axis=1)
        gu = blockwise_fp8_matmul(x_ND[tokens], gate_up_D2F, impl=impl, out_dtype=jnp.float32)
        g, u = jnp.split(gu, 2, axis=1)
        out = blockwise_fp8_matmul(jax.nn.silu(g) * u, experts.down_EFD[e], impl=impl, out_dtype=jnp.float32)
        y_ND = y_ND.at[tokens].add(out * flat_w[assign][:, None])
    return y_ND


def value_and_grads(fn, x_ND, weights_Nk, experts, ct_ND):
    y, vjp = jax.vjp(fn, x_ND, weights_Nk, experts)
    dx, dw, dex = vjp(ct_ND)
    return dict(zip(NAMES, (y, dx, dw, *dex)))


@functools.partial(jax.jit, static_argnames=("fp8_impl", "block_size"))
def blocked(x_ND, ids_Nk, weights_Nk, experts, ct_ND, *, fp8_impl, block_size=None):
    fn = lambda x, w, ex: dispatch_blocked(x, ids_Nk, w, ex, block_size=block_size, fp8_impl=fp8_impl)  # noqa: E731
    return value_and_grads(fn, x_ND, weights_Nk, experts, ct_ND)


def rel_frobenius(actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("skewed,block_size", [(False, None), (True, 128), (True, 256)])
def test_fp8_blocked_equals_per_expert_fp8_composition(skewed, block_size):
    x_ND, ids_Nk, weights_Nk, experts, ct_ND = make_inputs(skewed=skewed)
    got = blocked(x_ND, ids_Nk, weights_Nk, experts, ct_ND, fp8_impl="xla", block_size=block_size)
    ids_np = np.asarray(ids_Nk)  # concrete: the reference's per-expert row lists are static
    ref = jax.jit(lambda *a: value_and_grads(lambda x, w, ex: fp8_reference(x, ids_np, w, ex), *a))(
        x_ND, weights_Nk, experts, ct_ND
    )
    for name in NAMES:
        assert got[name].shape == ref[name].shape, name
        # float32 rounding (summation order of the scaled GEMMs and of the scatter-adds); an FP8
        # rounding flip of one element would show as ~1e-3.
        assert rel_frobenius(got[name], ref[name]) < 1e-5, (name, rel_frobenius(got[name], ref[name]))


def test_fp8_blocked_close_to_high_precision_blocked():
    x_ND, ids_Nk, weights_Nk, experts, ct_ND = make_inputs(skewed=True)
    got = blocked(x_ND, ids_Nk, weights_Nk, experts, ct_ND, fp8_impl="xla")
    exact = blocked(x_ND, ids_Nk, weights_Nk, experts, ct_ND, fp8_impl=None)
    for name in NAMES:
        err = rel_frobenius(got[name], exact[name])
        assert 1e-3 < err < np.sqrt(2) * 5e-2, (name, err)  # quantized (not vacuously equal), yet close
    # The empty expert gets exactly zero weight gradients.
    for name in ("dgate", "dup", "ddown"):
        assert not np.any(np.asarray(got[name][-1]))


def test_fp8_blocked_pallas_equals_xla():
    x_ND, ids_Nk, weights_Nk, experts, ct_ND = make_inputs(N=70, skewed=True)
    xla = blocked(x_ND, ids_Nk, weights_Nk, experts, ct_ND, fp8_impl="xla")
    pallas = blocked(x_ND, ids_Nk, weights_Nk, experts, ct_ND, fp8_impl="pallas")
    for name in NAMES:
        assert rel_frobenius(pallas[name], xla[name]) < 1e-5, (name, rel_frobenius(pallas[name], xla[name]))


def test_fp8_block_size_is_a_multiple_of_128():
    x_ND, ids_Nk, weights_Nk, experts, _ = make_inputs(N=20)
    with pytest.raises(ValueError, match="multiple of 128"):
        dispatch_blocked(x_ND, ids_Nk, weights_Nk, experts, block_size=64, fp8_impl="xla")
    with pytest.raises(ValueError, match="fp8_impl"):
        dispatch_blocked(x_ND, ids_Nk, weights_Nk, experts, fp8_impl="e5m2")
    # The ops spell high precision None only; the config's "off" is converted in one place (fp8_impl).
    with pytest.raises(ValueError, match="convert with ling_jax.ops.fp8.fp8_impl"):
        dispatch_blocked(x_ND, ids_Nk, weights_Nk, experts, block_size=8, fp8_impl="off")
    y_off = dispatch_blocked(x_ND, ids_Nk, weights_Nk, experts, block_size=8, fp8_impl=fp8_impl("off"))
    y_hp = dispatch_blocked(x_ND, ids_Nk, weights_Nk, experts, block_size=8)
    np.testing.assert_array_equal(np.asarray(y_off), np.asarray(y_hp))
