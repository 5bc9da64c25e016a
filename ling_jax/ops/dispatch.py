"""Token-to-expert dispatch: every implementation computes, for each token n,

    y[n] = sum_k weights[n, k] * expert_{ids[n, k]}(x[n]),   expert_e(x) = down_e(silu(gate_e x) * up_e x)

and all are exactly equal to float tolerance. Dropless: no token is ever dropped.

- "dense": every expert on every token, combined with a one-hot weight matrix. The plain reference
  (E / k times the useful FLOPs); tests compare every other path with it.
- "ragged": sort the N*k assignments by expert and run grouped matmuls (`grouped_matmul.grouped_matmul`:
  JAX's Mosaic-GPU grouped GEMM kernels on Hopper GPUs, `jax.lax.ragged_dot` elsewhere). On TPU
  ragged_dot lowers to a grouped GEMM that only touches each expert's rows; XLA:GPU's and XLA:CPU's
  lowerings cost about E times the useful work (masked dense dots).
- "blocked": expert-sorted rows padded per expert to a multiple of a block size b, then a grouped GEMM
  over fixed-size row blocks (a `lax.scan` that indexes each block's expert weights) with a hand-written
  VJP. Useful FLOPs plus at most E*(b-1) padding rows, static shapes, dropless; the pure-JAX CPU path.
  Layout, cost model and measurements: ling_jax/ops/dispatch_blocked.py.
- "cpu_kernel": one XLA FFI call into a compiled kernel (cpu_kernels/moe_experts.cc, built by setup.py
  where a C++ compiler is found): assignments grouped by expert with a counting sort, each expert's exact
  rows multiplied by its weights in place with OpenBLAS sgemm, experts spread over OpenMP threads; a
  second call for the backward. No padding rows, no loop over blocks. CPU and float32 only.

`default_dispatch(platform)` picks the implementation per backend. Ids outside [0, E) mean "no
assignment" for "dense", "blocked" and "cpu_kernel" (expert parallelism relies on it); "ragged" needs
valid ids.

These functions see whatever tokens they are given. Under a mesh the MoE layer calls them per shard
(`per_shard_dispatch` in ling_jax/ops/expert_parallel.py, inside `jax.shard_map`), so the
"ragged" / "blocked" expert sort covers one device's tokens; called on global arrays under GSPMD, that
sort is over the whole batch and is not partitioned.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cpu_kernels.moe_experts import available as moe_experts_available
from cpu_kernels.moe_experts import moe_experts
from ling_jax.ops.dispatch_blocked import auto_block_size, dispatch_blocked
from ling_jax.ops.expert_sort import sort_order
from ling_jax.ops.grouped_matmul import grouped_matmul, is_hopper


class ExpertWeights(NamedTuple):
    """Routed experts' SwiGLU weights, stacked over the expert axis E."""

    gate_EDF: jax.Array
    up_EDF: jax.Array
    down_EFD: jax.Array


def _swiglu(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def dispatch_dense(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights) -> jax.Array:
    E = experts.gate_EDF.shape[0]
    h_NEF = _swiglu(jnp.einsum("ND,EDF->NEF", x_ND, experts.gate_EDF), jnp.einsum("ND,EDF->NEF", x_ND, experts.up_EDF))
    out_NED = jnp.einsum("NEF,EFD->NED", h_NEF, experts.down_EFD)
    combine_NE = jnp.einsum("NkE,Nk->NE", jax.nn.one_hot(ids_Nk, E, dtype=jnp.float32), weights_Nk)
    return jnp.einsum("NE,NED->ND", combine_NE.astype(out_NED.dtype), out_NED)


def _sort_by_expert(ids_Nk, num_experts: int):
    """Assignments sorted by expert (stable): (token of each sorted assignment, the sort order, flat ids)."""
    N, k = ids_Nk.shape
    flat_ids = ids_Nk.reshape(-1)
    order = sort_order(flat_ids, num_experts)
    return order // k, order, flat_ids


def dispatch_ragged(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights) -> jax.Array:
    N, k = ids_Nk.shape
    E = experts.gate_EDF.shape[0]
    token_of, order, flat_ids = _sort_by_expert(ids_Nk, E)
    group_sizes_E = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    xs_MD = x_ND[token_of]
    h_MF = _swiglu(
        grouped_matmul(xs_MD, experts.gate_EDF, group_sizes_E),
        grouped_matmul(xs_MD, experts.up_EDF, group_sizes_E),
    )
    out_MD = grouped_matmul(h_MF, experts.down_EFD, group_sizes_E)
    out_NkD = jnp.zeros_like(out_MD).at[order].set(out_MD).reshape(N, k, -1)
    return jnp.einsum("NkD,Nk->ND", out_NkD, weights_Nk.astype(out_NkD.dtype))


def dispatch_cpu_kernel(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights) -> jax.Array:
    """The compiled CPU kernel (cpu_kernels/moe_experts.py): exact per-expert row groups, OpenBLAS GEMMs.
    float32 only: other compute dtypes run "blocked". Raises RuntimeError (with the reason) where the
    kernel was not built."""
    if any(a.dtype != jnp.float32 for a in (x_ND, *experts)):
        return dispatch_blocked(x_ND, ids_Nk, weights_Nk, experts)
    y_ND = moe_experts(x_ND, ids_Nk.astype(jnp.int32), weights_Nk.astype(jnp.float32), *experts)
    return y_ND.astype(x_ND.dtype)


DISPATCHERS = {
    "dense": dispatch_dense,
    "ragged": dispatch_ragged,
    "blocked": dispatch_blocked,
    "cpu_kernel": dispatch_cpu_kernel,
}
_TAKES_BLOCK_SIZE = ("blocked",)


def default_dispatch(platform: str) -> str:
    """The implementation to use on `platform` ("cpu", "gpu", "tpu"; e.g. `jax.default_backend()`).

    cpu: "cpu_kernel" where the compiled kernel is built (cpu_kernels/moe_experts.py), else "blocked".
         XLA:CPU turns ragged_dot into masked dense dots (measured forward + backward of a MoE layer
         with E 64, k 8: "ragged" ~110-170x and "dense" ~18-28x the dense-matmul floor), while the
         blocked grouped GEMM runs plain [b, D] x [D, 2F] matmuls (1.3-1.5x) and the kernel each
         expert's exact rows through OpenBLAS (benchmarks/README.md).
    tpu: "ragged" -- ragged_dot lowers to a grouped GEMM that skips the other experts' rows and needs
         no padding, and its (transposed) gradients are grouped GEMMs too.
    gpu: "ragged" on Hopper, where `grouped_matmul` runs JAX's Mosaic-GPU grouped GEMMs (measured on
         one H200, E 64, k 8, bf16: 3.6x the floor, "dense" 7.6x, "blocked" 14x); "dense" on other
         GPUs, where ragged_dot is XLA:GPU's masked dense dot (71x; a 16K-token train step ran out
         of memory).
    """
    platform = platform.lower()
    if platform == "cpu":
        return "cpu_kernel" if moe_experts_available() else "blocked"
    if platform == "tpu":
        return "ragged"
    if platform in ("gpu", "cuda", "rocm"):
        return "ragged" if is_hopper() else "dense"
    raise ValueError(f"unknown platform {platform!r}; expected 'cpu', 'gpu' or 'tpu'")


def dispatch(
    x_ND,
    ids_Nk,
    weights_Nk,
    experts: ExpertWeights,
    *,
    impl: str,
    block_size: int | None = None,
    fp8_impl: str | None = None,
) -> jax.Array:
    """y[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]) with implementation `impl`.

    x [N, D], ids [N, k] int, weights [N, k]; returns [N, D] in x's dtype. `block_size` (rows per block)
    applies to "blocked" only; None picks `auto_block_size` (from the mean rows per expert).
    `fp8_impl` (a model's `fp8` mode: None / "off", "xla", "pallas") puts the expert GEMMs in blockwise
    FP8; only "blocked" has an FP8 path: "dense" and "ragged" keep them in x's dtype and warn once.
    """
    if impl not in DISPATCHERS:
        raise ValueError(f"moe_dispatch {impl!r} is not one of {sorted(DISPATCHERS)}")
    if impl in _TAKES_BLOCK_SIZE:
        return DISPATCHERS[impl](x_ND, ids_Nk, weights_Nk, experts, block_size=block_size, fp8_impl=fp8_impl)
    if fp8_impl not in (None, "off"):
        _warn_no_fp8_once(impl)
    return DISPATCHERS[impl](x_ND, ids_Nk, weights_Nk, experts)


_warned_no_fp8: set[str] = set()


def _warn_no_fp8_once(impl: str) -> None:
    if impl not in _warned_no_fp8:
        _warned_no_fp8.add(impl)
        warnings.warn(
            f"moe_dispatch {impl!r} has no FP8 path: the routed experts run in the compute dtype "
            f"(use moe_dispatch='blocked' for FP8 routed experts)",
            RuntimeWarning,
            stacklevel=3,
        )


__all__ = [
    "DISPATCHERS",
    "auto_block_size",
    "ExpertWeights",
    "default_dispatch",
    "dispatch",
    "dispatch_blocked",
    "dispatch_cpu_kernel",
    "dispatch_dense",
    "dispatch_ragged",
]
