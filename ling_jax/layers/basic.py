"""Building blocks: a logically-partitioned parameter helper, Einsum projection, RMSNorm."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.ops.fp8 import FP8_STATS, check_projection_equation, fp8_impl, fp8_projection, quantization_stats


def param_with_axes(module: nn.Module, name: str, init_fn, shape: Sequence[int], axes: Sequence[str], dtype):
    """Creates a parameter whose logical axis names travel with it (see ling_jax/sharding/rules.py)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init_fn, tuple(axes)), tuple(shape), dtype)


class Einsum(nn.Module):
    """A projection `einsum(equation, x, kernel)` with the equation at the call site.

    The kernel is created with `shape` and logical `axes`; matmuls run in `dtype`. With `fp8`
    set ("xla" or "pallas"), the projection runs as a blockwise-scaled FP8 matmul (forward and
    backward) and sows quantization statistics of its input and kernel into "fp8_stats". The
    equation must contract x's last `contract` axes with the kernel's first ones (checked); it is
    computed as one 2-D matmul.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006
    fp8: str | None = None
    contract: int = 1

    @nn.compact
    def __call__(self, equation: str, x: jax.Array) -> jax.Array:
        kernel = param_with_axes(
            self, "kernel", nn.initializers.normal(self.init_std), self.shape, self.axes, self.param_dtype
        )
        check_projection_equation(equation, x.ndim, kernel.ndim, self.contract)
        if self.fp8 is None:  # as one 2-D matmul: XLA:CPU runs 3-D einsums ~1.5x slower (fwd + bwd)
            k = math.prod(kernel.shape[: self.contract])
            y_MN = jnp.dot(x.astype(self.dtype).reshape(-1, k), kernel.astype(self.dtype).reshape(k, -1))
            return y_MN.reshape(*x.shape[: x.ndim - self.contract], *kernel.shape[self.contract :])
        x_MK = x.reshape(-1, math.prod(x.shape[x.ndim - self.contract :]))
        for name, value in quantization_stats(x_MK, blocks=False).items():
            self.sow(FP8_STATS, f"input_{name}", value)
        for name, value in quantization_stats(kernel.reshape(x_MK.shape[1], -1), blocks=True).items():
            self.sow(FP8_STATS, f"kernel_{name}", value)
        return fp8_projection(
            x.astype(self.dtype), kernel.astype(self.dtype), contract=self.contract, impl=self.fp8, out_dtype=self.dtype
        )


def projection(cfg, shape, axes, name: str, contract: int = 1) -> Einsum:
    """An Einsum with the config's dtypes, init and FP8 mode."""
    return Einsum(
        tuple(shape),
        tuple(axes),
        cfg.jnp_dtype,
        cfg.jnp_param_dtype,
        cfg.init_std,
        fp8=fp8_impl(cfg.fp8),
        contract=contract,
        name=name,
    )


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """scale * x / rms(x), statistics in float32, result in x's dtype (as the reference)."""
    x_f32 = x.astype(jnp.float32)
    normed = x_f32 * jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis; `axis_name` is the logical name of the scale's one axis."""

    eps: float = 1e-6
    axis_name: str = "norm"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(
            self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype
        )
        return rms_norm(x, scale, self.eps)
