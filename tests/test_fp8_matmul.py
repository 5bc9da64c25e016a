"""Tests of pallas_kernels.fp8_matmul: quantization, XLA reference, Pallas kernel, custom_vjp.

Tolerances:
- Quantization (fp8 codes and float32 scales) is bit-exact vs an independent numpy version.
- The XLA reference equals a numpy float64 dequantize-then-matmul up to float32 accumulation
  rounding: |err| <= 1e-5 * (|x_dq| @ |w_dq|) elementwise (FP8 products are exact in f32).
- FP8 vs the high-precision matmul: relative Frobenius error < 5e-2 (E4M3 keeps 3 mantissa
  bits: ~2.6% RMS relative rounding per operand, ~3.7% measured on the product), per row for
  rows skewed over 1e-3..1e3 (per-row tiles make each row's error independent of the others).
- impl="pallas" (interpret mode on CPU) vs impl="xla": per-row max-relative 1e-5 with float32
  outputs and gradients, 1e-2 (one bf16 rounding) with bfloat16 ones.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import common as pallas_common
from pallas_kernels.fp8_matmul import (
    FP8_E4M3_MAX,
    Fp8MatmulConfig,
    blockwise_fp8_matmul,
    quantize_blocks,
    quantize_tiles,
)
from pallas_kernels.fp8_matmul import kernel as fp8_kernel
from pallas_kernels.fp8_matmul import kernel_gpu as fp8_kernel_gpu
from pallas_kernels.fp8_matmul import reference as fp8_reference

SHAPES = [(128, 128, 128), (200, 300, 130), (1, 128, 256), (256, 384, 512)]
DATA_KINDS = ["gaussian", "skewed_rows", "outliers"]
Q = 128


def make_inputs(kind, m, k, n, seed=0):
    """x [M, K], w [K, N], dy [M, N] float32 numpy arrays of the given flavour."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    if kind == "skewed_rows":
        x *= 10.0 ** rng.uniform(-3, 3, (m, 1)).astype(np.float32)
        dy *= 10.0 ** rng.uniform(-3, 3, (m, 1)).astype(np.float32)
    elif kind == "outliers":
        x.flat[rng.choice(x.size, max(1, x.size // 500), replace=False)] *= 1000.0
        w.flat[rng.choice(w.size, max(1, w.size // 500), replace=False)] *= 100.0
    return x, w, dy


# ---------- independent numpy quantization (float64 dequantization) ----------


def np_quant_tiles(x_RC):
    r, c = x_RC.shape
    cp = -(-c // Q) * Q
    padded = np.zeros((r, cp), np.float32)
    padded[:, :c] = x_RC
    tiles = padded.reshape(r, cp // Q, Q)
    amax = np.abs(tiles).max(-1)
    scales = np.where(amax > 0, amax * np.float32(1 / 448), np.float32(1.0)).astype(np.float32)
    codes = np.clip(tiles / scales[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return codes.reshape(r, cp), scales


def np_quant_blocks(w_RC):
    r, c = w_RC.shape
    rp, cp = -(-r // Q) * Q, -(-c // Q) * Q
    padded = np.zeros((rp, cp), np.float32)
    padded[:r, :c] = w_RC
    blocks = padded.reshape(rp // Q, Q, cp // Q, Q)
    amax = np.abs(blocks).max(axis=(1, 3))
    scales = np.where(amax > 0, amax * np.float32(1 / 448), np.float32(1.0)).astype(np.float32)
    codes = np.clip(blocks / scales[:, None, :, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return codes.reshape(rp, cp), scales


def np_dequant_tiles(x_RC):
    codes, scales = np_quant_tiles(x_RC)
    return (codes.astype(np.float64) * np.repeat(scales, Q, axis=1))[:, : x_RC.shape[1]]


def np_dequant_blocks(w_RC):
    codes, scales = np_quant_blocks(w_RC)
    full = np.repeat(np.repeat(scales, Q, axis=0), Q, axis=1)
    return (codes.astype(np.float64) * full)[: w_RC.shape[0], : w_RC.shape[1]]


def np_fp8_matmul_and_grads(x, w, dy):
    """The documented recipe, in float64 from the quantized operands: (y, dx, dw) + bounds."""
    x_dq, w_dq = np_dequant_tiles(x), np_dequant_blocks(w)
    dy_dq = np_dequant_tiles(dy)
    x_t_dq, dy_t_dq = np_dequant_tiles(x.T), np_dequant_tiles(dy.T)  # tiles along M
    pairs = [(x_dq, w_dq), (dy_dq, w_dq.T), (x_t_dq, dy_t_dq.T)]
    return [(a @ b, np.abs(a) @ np.abs(b)) for a, b in pairs]


# ---------- jitted op under test ----------


@functools.partial(jax.jit, static_argnames=("impl", "out_dtype"))
def fwd_and_vjp(x, w, dy, *, impl, out_dtype):
    y, vjp = jax.vjp(lambda x, w: blockwise_fp8_matmul(x, w, impl=impl, out_dtype=out_dtype), x, w)
    return (y, *vjp(dy.astype(out_dtype)))


def assert_rowwise_close(actual, expected, rel):
    """|a - e| <= rel * max|e| of the same row (scale-free for rows of any magnitude)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    row_scale = np.abs(expected).max(axis=1, keepdims=True) + 1e-30
    assert actual.shape == expected.shape
    worst = float(np.max(np.abs(actual - expected) / row_scale))
    assert worst <= rel, f"row-relative error {worst:.3g} > {rel}"


def rel_frobenius(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# ---------- quantization ----------


@pytest.mark.parametrize("shape", [(2, 128), (200, 300), (130, 257)])
def test_quantization_bit_exact_vs_numpy(shape):
    x, _, _ = make_inputs("outliers", *shape, 1)
    x[0] = 0.0  # an all-zero row: scale 1, codes 0
    codes, scales = quantize_tiles(jnp.asarray(x))
    np_codes, np_scales = np_quant_tiles(x)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), np_codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(scales), np_scales)
    assert np.all(np.asarray(scales)[0] == 1.0)
    codes, scales = quantize_blocks(jnp.asarray(x))
    np_codes, np_scales = np_quant_blocks(x)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), np_codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(scales), np_scales)
    assert float(np.abs(np.asarray(codes, np.float32)).max()) == FP8_E4M3_MAX


# ---------- XLA reference ----------


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_reference_equals_numpy_dequant_matmul(m, k, n, kind):
    x, w, dy = make_inputs(kind, m, k, n)
    outs = fwd_and_vjp(x, w, dy, impl="xla", out_dtype=jnp.float32)
    for out, (expected, abs_bound) in zip(outs, np_fp8_matmul_and_grads(x, w, dy)):
        err = np.abs(np.asarray(out, np.float64) - expected)
        assert np.all(err <= 1e-5 * abs_bound + 1e-30), float(np.max(err / (abs_bound + 1e-30)))


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_reference_close_to_high_precision(m, k, n, kind):
    x, w, dy = make_inputs(kind, m, k, n)
    y, dx, dw = fwd_and_vjp(x, w, dy, impl="xla", out_dtype=jnp.float32)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    exact = [x64 @ w64, dy64 @ w64.T, x64.T @ dy64]
    for out, ref in zip((y, dx, dw), exact):
        assert rel_frobenius(out, ref) < 5e-2
    if kind == "skewed_rows" and m > 1:  # each row, whatever its magnitude
        for out, ref in ((y, exact[0]), (dx, exact[1])):
            row_err = np.linalg.norm(np.asarray(out) - ref, axis=1) / np.linalg.norm(ref, axis=1)
            assert row_err.max() < 6e-2


def test_zero_inputs_give_zero_outputs_and_grads():
    zeros = np.zeros((200, 300), np.float32)
    outs = fwd_and_vjp(
        zeros, np.zeros((300, 130), np.float32), np.ones((200, 130), np.float32), impl="pallas", out_dtype=jnp.float32
    )
    for out in outs:
        assert np.all(np.asarray(out) == 0.0)


# ---------- Pallas kernel vs reference ----------


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_pallas_matches_reference_f32(m, k, n, kind):
    x, w, dy = make_inputs(kind, m, k, n)
    got = fwd_and_vjp(x, w, dy, impl="pallas", out_dtype=jnp.float32)
    want = fwd_and_vjp(x, w, dy, impl="xla", out_dtype=jnp.float32)
    for name, g, e in zip(("y", "dx", "dw"), got, want):
        assert g.dtype == e.dtype == jnp.float32, name
        assert_rowwise_close(g, e, 1e-5)


@pytest.mark.parametrize("m,k,n", [(200, 300, 130), (256, 384, 512)])
def test_pallas_matches_reference_bf16(m, k, n):
    x, w, dy = (jnp.asarray(a, jnp.bfloat16) for a in make_inputs("skewed_rows", m, k, n))
    got = fwd_and_vjp(x, w, dy, impl="pallas", out_dtype=jnp.bfloat16)
    want = fwd_and_vjp(x, w, dy, impl="xla", out_dtype=jnp.bfloat16)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype == jnp.bfloat16
        assert_rowwise_close(g, e, 1e-2)


def test_small_blocks_and_fp8_mxu_operands():
    """Several M/N tiles per problem and fp8 in-kernel dot operands give the same result."""
    x, w, dy = make_inputs("outliers", 200, 300, 390)
    config = Fp8MatmulConfig(block_m=64, block_n=128, mxu_dtype="float8_e4m3fn")

    @jax.jit
    def run(x, w, dy):
        y, vjp = jax.vjp(
            lambda x, w: blockwise_fp8_matmul(x, w, impl="pallas", out_dtype=jnp.float32, config=config), x, w
        )
        return (y, *vjp(dy))

    want = fwd_and_vjp(x, w, dy, impl="xla", out_dtype=jnp.float32)
    for g, e in zip(run(x, w, dy), want):
        assert_rowwise_close(g, e, 1e-5)


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("m,k,n", [(200, 300, 130), (1, 128, 256), (256, 384, 512)])
def test_gpu_kernel_matches_reference(monkeypatch, m, k, n, kind):
    """The Triton kernel (interpret mode), chosen by the op on a GPU backend, fwd and both grads."""
    x, w, dy = make_inputs(kind, m, k, n)
    want = fwd_and_vjp(x, w, dy, impl="xla", out_dtype=jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = Fp8MatmulConfig(interpret=True, gpu_block_m=64, gpu_block_n=128)

    @jax.jit
    def run(x, w, dy):
        y, vjp = jax.vjp(
            lambda x, w: blockwise_fp8_matmul(x, w, impl="pallas", out_dtype=jnp.float32, config=config), x, w
        )
        return (y, *vjp(dy))

    for g, e in zip(run(x, w, dy), want):
        assert_rowwise_close(g, e, 1e-5)


@pytest.mark.parametrize("b_block_scales", [True, False])
def test_gpu_kernel_scaled_gemm_both_scale_modes(b_block_scales):
    """Operand level: block-mode and tile-mode b scales, M and N not multiples of the tile."""
    rng = np.random.default_rng(3)
    m, kp, n = 72, 384, 256
    a_q = jnp.asarray(rng.standard_normal((m, kp)) * 50, jnp.float8_e4m3fn)
    b_q = jnp.asarray(rng.standard_normal((kp, n)) * 50, jnp.float8_e4m3fn)
    a_s = jnp.asarray(10.0 ** rng.uniform(-3, 3, (m, kp // Q)), jnp.float32)
    b_shape = (kp // Q, n // Q) if b_block_scales else (kp // Q, n)
    b_s = jnp.asarray(10.0 ** rng.uniform(-3, 3, b_shape), jnp.float32)
    config = Fp8MatmulConfig(interpret=True, gpu_block_m=32, gpu_block_n=128)
    got = fp8_kernel_gpu.pallas_scaled_matmul_gpu(a_q, a_s, b_q, b_s, b_block_scales=b_block_scales, config=config)
    want = fp8_reference.scaled_matmul_reference(a_q, a_s, b_q, b_s, b_block_scales=b_block_scales)
    assert_rowwise_close(got, want, 1e-6)


# ---------- fallback and validation ----------


def test_unsupported_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(pallas_common, "_warned", set())
    monkeypatch.setattr(jax, "default_backend", lambda: "metal")  # no Pallas path there
    x, w, _ = make_inputs("gaussian", 64, 256, 128)
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = blockwise_fp8_matmul(x, w, impl="pallas", out_dtype=jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = blockwise_fp8_matmul(x, w, impl="pallas", out_dtype=jnp.float32)
    want = blockwise_fp8_matmul(x, w, impl="xla", out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(want))


def test_kernel_refuses_oversized_scale_tables():
    fp8_kernel.check_supported(64, 8192, True, 256, 256)  # K = N = 8192 fits SMEM
    with pytest.raises(NotImplementedError, match="SMEM"):
        fp8_kernel.check_supported(128, 128 * 128, True, 256, 256)
    with pytest.raises(NotImplementedError, match="VMEM"):
        fp8_kernel.check_supported(4096, 1024, False, 256, 256)


@pytest.mark.parametrize(
    "x_shape,w_shape,kwargs,match",
    [
        ((4, 8), (9, 4), {}, "contraction mismatch"),
        ((2, 4, 8), (8, 4), {}, "2-D"),
        ((4, 8), (8, 4), {"impl": "cuda"}, "impl must be"),
        ((4, 8), (8, 4), {"out_dtype": jnp.int8}, "out_dtype"),
        ((0, 8), (8, 4), {}, "empty"),
    ],
)
def test_rejects_bad_arguments(x_shape, w_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        blockwise_fp8_matmul(jnp.ones(x_shape), jnp.ones(w_shape), **kwargs)


def test_rejects_integer_inputs_and_bad_block_config():
    with pytest.raises(ValueError, match="float32/bfloat16"):
        blockwise_fp8_matmul(jnp.ones((4, 8), jnp.int32), jnp.ones((8, 4)))
    with pytest.raises(ValueError, match="block_m"):
        Fp8MatmulConfig(block_m=100)
    with pytest.raises(ValueError, match="block_n"):
        Fp8MatmulConfig(block_n=200)
    with pytest.raises(ValueError, match="mxu_dtype"):
        Fp8MatmulConfig(mxu_dtype="float16")
    with pytest.raises(ValueError, match="gpu_block_n"):
        Fp8MatmulConfig(gpu_block_n=96)
