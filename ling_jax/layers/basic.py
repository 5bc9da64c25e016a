"""Building blocks: a logically-partitioned parameter helper, Einsum projection, RMSNorm."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def param_with_axes(module: nn.Module, name: str, init_fn, shape: Sequence[int], axes: Sequence[str], dtype):
    """Creates a parameter whose logical axis names travel with it (see ling_jax/sharding/rules.py)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init_fn, tuple(axes)), tuple(shape), dtype)


class Einsum(nn.Module):
    """A projection `einsum(equation, x, kernel)` with the equation at the call site.

    The kernel is created with `shape` and logical `axes`; matmuls run in `dtype` with float32
    accumulation where the backend supports it.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006

    @nn.compact
    def __call__(self, equation: str, x: jax.Array) -> jax.Array:
        kernel = param_with_axes(
            self, "kernel", nn.initializers.normal(self.init_std), self.shape, self.axes, self.param_dtype
        )
        return jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))


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
