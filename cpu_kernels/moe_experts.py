"""The routed experts of a MoE layer as one XLA FFI call on CPU (cpu_kernels/moe_experts.cc).

    y[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]),   expert_e(x) = down_e(silu(x gate_e) * (x up_e))

float32 only; differentiable in x, weights and the three expert weights (custom VJP: the backward is
a second FFI call that reads the forward's pre-activations). Ids outside [0, E) are "no assignment".
Inside `jax.shard_map` (the MoE layer's per-shard dispatch) it runs on each device's own tokens.

The kernel groups the assignments by expert (counting sort) and multiplies each expert's rows by its
weights in place with OpenBLAS sgemm, experts spread over the OpenMP threads: no padding rows, no
weight copies and no loop over fixed-size blocks, which is where the pure-JAX "blocked" dispatch
loses time on XLA:CPU (benchmarks/README.md).

The extension is optional (setup.py); `unavailable_reason()` says why it cannot be used, and the
MoE layer then falls back to "blocked".
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

import shard_typing

_FORWARD = "ling_moe_experts_forward"
_BACKWARD = "ling_moe_experts_backward"


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernel is loaded and registered with XLA (done once); else why it is not."""
    if not sys.platform.startswith("linux"):
        return f"the CPU MoE kernel is built on Linux only (this is {sys.platform})"
    spec = importlib.util.find_spec("cpu_kernels._moe_experts")
    if spec is None or not spec.origin:
        return "the extension cpu_kernels._moe_experts was not built (reinstall with a C++ compiler and OpenMP)"
    try:
        import scipy_openblas32

        # The kernel calls OpenBLAS's scipy_cblas_sgemm: load the library first, with its symbols global.
        blas = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")
        ctypes.CDLL(blas, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(spec.origin)
    except (ImportError, OSError) as err:
        return f"the CPU MoE kernel could not be loaded: {err}"
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.LingMoeExpertsForward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.LingMoeExpertsBackward), platform="cpu")
    return None


def available() -> bool:
    return unavailable_reason() is None


def call_matmul_flops(target_name: str, operand_shapes) -> float | None:
    """Matmul FLOPs of one call of this kernel's FFI targets (None for other targets), counting every
    assignment: forward 3 GEMMs of D x F per row, backward 6 (dyW, d down, d gate, d up, dx twice)."""
    if target_name not in (_FORWARD, _BACKWARD):
        return None
    (N, D), (_, k), gate_EDF = operand_shapes[0], operand_shapes[1], operand_shapes[3]
    per_row = 2 * D * gate_EDF[2] * (3 if target_name == _FORWARD else 6)
    return float(N * k * per_row)


def _call(target: str, out_shapes, *args):
    """The FFI call, inside `jax.shard_map` with every operand and result typed as varying along the
    mesh axes any operand varies along (the FFI call's typing rule wants operands that agree)."""
    vma = shard_typing.varying_axes(*args)
    args = tuple(
        lax.pcast(a, tuple(sorted(vma - shard_typing.varying_axes(a))), to="varying")
        if vma - shard_typing.varying_axes(a)
        else a
        for a in args
    )
    # Under jax.vmap (e.g. per-position gradients) the call runs once per batch element.
    return jax.ffi.ffi_call(
        target, [shard_typing.out_struct(s, jnp.float32, *args) for s in out_shapes], vmap_method="sequential"
    )(*args)


def _check(x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD) -> None:
    N, D = x_ND.shape
    E, _, F = gate_EDF.shape
    want = {
        "x": (x_ND, (N, D)),
        "ids": (ids_Nk, (N, ids_Nk.shape[-1])),
        "weights": (weights_Nk, ids_Nk.shape),
        "gate": (gate_EDF, (E, D, F)),
        "up": (up_EDF, (E, D, F)),
        "down": (down_EFD, (E, F, D)),
    }
    for name, (array, shape) in want.items():
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"moe_experts: {name} has shape {tuple(array.shape)}, expected {tuple(shape)} "
                f"(x [N, D], ids and weights [N, k], gate and up [E, D, F], down [E, F, D])"
            )
        dtype = jnp.int32 if name == "ids" else jnp.float32
        if array.dtype != dtype:
            raise ValueError(f"moe_experts: {name} must be {jnp.dtype(dtype).name}, got {array.dtype}")


@jax.custom_vjp
def _experts(x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD):
    return _experts_fwd(x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD)[0]


def _experts_fwd(x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD):
    N, k = ids_Nk.shape
    F = gate_EDF.shape[2]
    args = (x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD)
    y_ND, gu_M2F = _call(_FORWARD, [x_ND.shape, (N * k, 2 * F)], *args)
    return y_ND, (*args, gu_M2F)


def _experts_bwd(residuals, dy_ND):
    x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD, gu_M2F = residuals
    shapes = [a.shape for a in (x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD)]
    dx, dweights, dgate, dup, ddown = _call(
        _BACKWARD, shapes, x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD, dy_ND.astype(jnp.float32), gu_M2F
    )
    # Undo the pcast of invariant operands (`_call`): their cotangents are summed over those axes.
    dx, dweights, dgate, dup, ddown = (
        shard_typing.reduce_to_varying(ct, p)
        for ct, p in zip((dx, dweights, dgate, dup, ddown), (x_ND, weights_Nk, gate_EDF, up_EDF, down_EFD))
    )
    return dx, None, dweights, dgate, dup, ddown


_experts.defvjp(_experts_fwd, _experts_bwd)


def moe_experts(x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD) -> jax.Array:
    """y [N, D] float32 (module docstring). Raises RuntimeError when the kernel is unavailable and
    ValueError, naming the array, on a shape or dtype mismatch."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    _check(x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD)
    return _experts(x_ND, ids_Nk, weights_Nk, gate_EDF, up_EDF, down_EFD)
