"""Public op: `blockwise_fp8_matmul` with an FP8 custom_vjp and an `impl=` switch.

impl="xla" runs the pure-JAX reference GEMM; impl="pallas" runs a Pallas kernel: the Mosaic one
(`kernel.py`) compiled on TPU and in interpret mode on CPU, the Triton one (`kernel_gpu.py`) on
GPU. A case the kernel does not support raises NotImplementedError
inside, and that GEMM falls back to the reference with a warning (once per reason). Both
impls share the quantization and the forward/backward composition in `reference.py`, so they
differ only in who computes the scaled GEMMs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.fp8_matmul import kernel, kernel_gpu, reference
from pallas_kernels.fp8_matmul.config import Fp8MatmulConfig

IMPLS = ("xla", "pallas")
INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
OUT_DTYPES = (jnp.float32, jnp.bfloat16)


def _warn_once(reason: str) -> None:
    common.warn_fallback_once("blockwise_fp8_matmul", reason)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable; the custom_vjp's only nondiff argument)."""

    impl: str
    out_dtype: jnp.dtype
    config: Fp8MatmulConfig


def scaled_gemm(impl: str, config: Fp8MatmulConfig | None = None, platform: str | None = None) -> reference.ScaledGemm:
    """The blockwise-scaled GEMM on quantized operands that `blockwise_fp8_matmul(impl=...)` runs, for
    callers that quantize once and multiply many times (e.g. the routed experts).

    impl "xla": the reference. "pallas": the Triton kernel when `platform` (default: the default
    backend) is "gpu", else the Mosaic kernel (compiled on TPU, interpreted on CPU); a problem the
    kernel refuses (NotImplementedError) runs the reference, with a one-time warning.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "xla":
        return reference.scaled_matmul_reference
    config = config if config is not None else Fp8MatmulConfig()
    on_gpu = (platform or jax.default_backend()) == "gpu"
    pallas_kernel = kernel_gpu.pallas_scaled_matmul_gpu if on_gpu else kernel.pallas_scaled_matmul

    def pallas_gemm(*operands, b_block_scales, out_dtype):
        try:
            return pallas_kernel(*operands, b_block_scales=b_block_scales, out_dtype=out_dtype, config=config)
        except NotImplementedError as err:
            _warn_once(str(err))
            return reference.scaled_matmul_reference(*operands, b_block_scales=b_block_scales, out_dtype=out_dtype)

    return pallas_gemm


def _gemm(static: _Static) -> reference.ScaledGemm:
    return scaled_gemm(static.impl, static.config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_matmul(static: _Static, x_MK, w_KN):
    return reference.fp8_matmul_forward(x_MK, w_KN, static.out_dtype, _gemm(static))[0]


def _fp8_matmul_fwd(static: _Static, x_MK, w_KN):
    return reference.fp8_matmul_forward(x_MK, w_KN, static.out_dtype, _gemm(static))


def _fp8_matmul_bwd(static: _Static, residuals, dy_MN):
    return reference.fp8_matmul_backward(residuals, dy_MN, _gemm(static))


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def _check_args(x_MK, w_KN, impl, out_dtype) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if getattr(x_MK, "ndim", None) != 2 or getattr(w_KN, "ndim", None) != 2:
        raise ValueError(
            f"x and w must be 2-D arrays [M, K] and [K, N]; got shapes "
            f"{getattr(x_MK, 'shape', None)} and {getattr(w_KN, 'shape', None)}"
        )
    if x_MK.shape[1] != w_KN.shape[0]:
        raise ValueError(f"contraction mismatch: x is {x_MK.shape} but w is {w_KN.shape}")
    if min(*x_MK.shape, w_KN.shape[1]) < 1:
        raise ValueError(f"empty operands are not supported: x {x_MK.shape}, w {w_KN.shape}")
    for name, arr in (("x", x_MK), ("w", w_KN)):
        if arr.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} must be float32/bfloat16/float16 (quantized inside), got {arr.dtype}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")


def blockwise_fp8_matmul(
    x_MK: jax.Array,
    w_KN: jax.Array,
    *,
    impl: str = "xla",
    out_dtype=jnp.bfloat16,
    config: Fp8MatmulConfig | None = None,
) -> jax.Array:
    """y = x @ w with DeepSeek/Ling-style blockwise FP8 (E4M3) quantization, fwd and bwd.

    Args:
      x_MK: activations [M, K], float32/bfloat16/float16; quantized in [1, 128] tiles (one
        float32 scale amax/448 per row per 128-column block of K).
      w_KN: weights [K, N], same dtypes; quantized in [128, 128] blocks (one scale per block).
      impl: "xla" (pure-JAX reference) or "pallas" (the TPU kernel, or the Triton kernel on GPU;
        falls back to "xla" with a warning when the kernel refuses the problem).
      out_dtype: float32 or bfloat16. Accumulation is always float32.
      config: kernel block sizes / interpret switch (see Fp8MatmulConfig).

    Returns:
      y_MN [M, N] in out_dtype. Gradients (dx in x's dtype, dw in w's dtype) are computed in FP8
      as described in `reference.py`: dy in [1, 128] tiles along N for dx (with w's forward
      blocks transposed); x and dy both re-quantized in tiles along M for dw.
    """
    _check_args(x_MK, w_KN, impl, out_dtype)
    static = _Static(
        impl=impl, out_dtype=jnp.dtype(out_dtype), config=config if config is not None else Fp8MatmulConfig()
    )
    return _fp8_matmul(static, x_MK, w_KN)
