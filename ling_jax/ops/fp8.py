"""FP8 mixed precision for projections: blockwise-scaled E4M3 matmuls (Ling 2.0 / DeepSeek-V3
recipe: activations and gradients in [1, 128] tiles, weights in [128, 128] blocks, float32 scales
and accumulation; see pallas_kernels/fp8_matmul) plus the per-op health statistics the recipe
monitors: the fraction of non-zero values that underflow to zero, and the cosine similarity of a
tensor with its quantize-dequantize round trip.

With impl="pallas" the kernels compile for the platform of the mesh the step is traced under and run
per batch (and sequence) shard under a multi-device mesh (ling_jax/ops/pallas_target.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ling_jax.ops.pallas_target import kernel_platform, pallas_interpret, token_wise
from pallas_kernels.fp8_matmul import Fp8MatmulConfig, blockwise_fp8_matmul, quantize_blocks, quantize_tiles
from pallas_kernels.fp8_matmul import ops as fp8_ops
from pallas_kernels.fp8_matmul import reference as fp8_reference
from pallas_kernels.fp8_matmul.config import QUANT_BLOCK

FP8_STATS = "fp8_stats"  # variable collection the statistics are sown into
FP8_IMPLS = ("xla", "pallas")  # what the ops take; None is high precision
CONFIG_FP8_OFF = "off"  # how the model config (ling_jax/config.py FP8_MODES) spells high precision


def fp8_impl(mode: str) -> str | None:
    """The ops' FP8 argument for a config's `fp8` mode: "off" -> None, "xla" / "pallas" unchanged.
    The one place the config's spelling meets the ops'."""
    if mode == CONFIG_FP8_OFF:
        return None
    return check_fp8_impl(mode)


def check_fp8_impl(impl: str | None) -> str | None:
    """`impl` if the ops take it (None, "xla", "pallas"), else ValueError saying what to pass."""
    if impl is not None and impl not in FP8_IMPLS:
        hint = " (the config's 'off' is None here: convert with ling_jax.ops.fp8.fp8_impl)" if impl == "off" else ""
        raise ValueError(f"fp8_impl must be None, 'xla' or 'pallas', got {impl!r}{hint}")
    return impl


def fp8_config() -> Fp8MatmulConfig:
    """The FP8 matmul's default blocks, compiled or interpreted for the traced program's target."""
    return Fp8MatmulConfig(interpret=pallas_interpret())


def scaled_gemm(impl: str) -> fp8_reference.ScaledGemm:
    """The FP8 matmul op's scaled GEMM (`pallas_kernels.fp8_matmul.ops.scaled_gemm`) for pre-quantized
    operands, with the kernel chosen and compiled for the traced program's target platform."""
    return fp8_ops.scaled_gemm(impl, fp8_config(), kernel_platform())


def _dequantize(q, scales, rows, cols, block_rows: int):
    q32 = q.astype(jnp.float32)
    s = jnp.repeat(jnp.repeat(scales, block_rows, axis=0)[: q.shape[0]], QUANT_BLOCK, axis=1)
    return (q32 * s[:, : q.shape[1]])[:rows, :cols]


def quantization_stats(x_RC: jax.Array, *, blocks: bool) -> dict[str, jax.Array]:
    """Underflow fraction and quantize-dequantize cosine similarity of a 2-D tensor, quantized in
    [128, 128] blocks (weights) or [1, 128] tiles (activations)."""
    x_RC = jax.lax.stop_gradient(x_RC).astype(jnp.float32)
    rows, cols = x_RC.shape
    q, scales = quantize_blocks(x_RC) if blocks else quantize_tiles(x_RC)
    x_dq = _dequantize(q, scales, rows, cols, QUANT_BLOCK if blocks else 1)
    nonzero = x_RC != 0
    underflow = jnp.sum(nonzero & (x_dq == 0)) / jnp.maximum(jnp.sum(nonzero), 1)
    cosine = jnp.sum(x_RC * x_dq) / jnp.maximum(jnp.linalg.norm(x_RC) * jnp.linalg.norm(x_dq), 1e-30)
    return {"underflow": underflow, "cosine": cosine}


def check_projection_equation(equation: str, x_ndim: int, kernel_ndim: int, contract: int) -> None:
    """FP8 projections flatten to one 2-D matmul: the equation must contract x's last `contract`
    axes with the kernel's first `contract` axes and keep the rest in order."""
    lhs, out = equation.replace(" ", "").split("->")
    x_axes, k_axes = lhs.split(",")
    ok = (
        len(x_axes) == x_ndim
        and len(k_axes) == kernel_ndim
        and x_axes[x_ndim - contract :] == k_axes[:contract]
        and out == x_axes[: x_ndim - contract] + k_axes[contract:]
    )
    if not ok:
        raise ValueError(
            f"FP8 projection needs an equation contracting x's last {contract} axes with the kernel's first "
            f"{contract}, got {equation!r}"
        )


def fp8_projection(x, kernel, *, contract: int, impl: str, out_dtype) -> jax.Array:
    """x [..., *C] @ kernel [*C, *O] -> [..., *O] through the blockwise FP8 matmul.

    The matmul takes [M, K] rows; `token_wise` keeps [B, T] where a context axis splits T."""
    k = math.prod(kernel.shape[:contract])
    lead = x.shape[: x.ndim - contract]
    w_KN = kernel.reshape(k, -1)

    def matmul(x_MC, w_KN):
        return blockwise_fp8_matmul(x_MC.reshape(-1, k), w_KN, impl=impl, out_dtype=out_dtype, config=fp8_config())

    y = token_wise(matmul, x, (w_KN,), kernel=impl == "pallas", token_dims=len(lead))
    return y.reshape(*lead, *kernel.shape[contract:])
