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

Which one runs: `select_impl` (below), the one selector the MoE layer, the planner and the
benchmarks call, from one registry (`IMPLS`) and one fallback order (`auto_order`).

Ids outside [0, E) mean "no assignment" for "dense", "blocked" and "cpu_kernel" (expert parallelism
relies on it); "ragged" needs valid ids.

These functions see whatever tokens they are given. Under a mesh the MoE layer calls them per shard
(`per_shard_dispatch` in ling_jax/ops/expert_parallel.py, inside `jax.shard_map`), so the
"ragged" / "blocked" expert sort covers one device's tokens; called on global arrays under GSPMD, that
sort is over the whole batch and is not partitioned.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

import cpu_kernels.moe_experts as moe_experts_kernel
from ling_jax.ops.dispatch_blocked import auto_block_size, dispatch_blocked
from ling_jax.ops.expert_sort import sort_order
from ling_jax.ops.grouped_matmul import grouped_matmul
from ling_jax.ops.pallas_target import Target, kernel_target


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
        grouped_matmul(xs_MD, experts.gate_EDF, group_sizes_E), grouped_matmul(xs_MD, experts.up_EDF, group_sizes_E)
    )
    out_MD = grouped_matmul(h_MF, experts.down_EFD, group_sizes_E)
    out_NkD = jnp.zeros_like(out_MD).at[order].set(out_MD).reshape(N, k, -1)
    return jnp.einsum("NkD,Nk->ND", out_NkD, weights_Nk.astype(out_NkD.dtype))


def dispatch_cpu_kernel(x_ND, ids_Nk, weights_Nk, experts: ExpertWeights) -> jax.Array:
    """The compiled CPU kernel (cpu_kernels/moe_experts.py): exact per-expert row groups, OpenBLAS GEMMs.
    float32 only (`select_impl` sends other dtypes elsewhere). Raises RuntimeError (with the reason)
    where the kernel was not built."""
    y_ND = moe_experts_kernel.moe_experts(x_ND, ids_Nk.astype(jnp.int32), weights_Nk.astype(jnp.float32), *experts)
    return y_ND.astype(x_ND.dtype)


@dataclasses.dataclass(frozen=True)
class Query:
    """What the choice depends on: the target devices, the expert GEMMs' compute dtype, the FP8 mode
    of the expert GEMMs (None: high precision; "xla" / "pallas") and whether the CPU kernel is built."""

    target: Target
    dtype: jnp.dtype
    fp8: str | None = None
    kernel_built: bool = True

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.fp8 not in (None, "xla", "pallas"):
            raise ValueError(f"fp8 must be None, 'xla' or 'pallas' (ops spell FP8 off as None), got {self.fp8!r}")


@dataclasses.dataclass(frozen=True)
class MoeImpl:
    """One routed-expert implementation: the function, and two predicates returning None (fine) or
    the reason it cannot serve a query. `operands`: what the implementation computes (dtype, FP8),
    `machine`: whether it exists on the target at all (platform, kernel built)."""

    name: str
    fn: Callable
    operands: Callable[[Query], str | None] = lambda q: None
    machine: Callable[[Query], str | None] = lambda q: None
    takes_block_size: bool = False


def _no_fp8(q: Query) -> str | None:
    return f"it has no FP8 path (fp8={q.fp8!r}); only 'blocked' runs FP8 expert GEMMs" if q.fp8 else None


def _cpu_kernel_operands(q: Query) -> str | None:
    if q.dtype != jnp.float32:
        return f"the CPU kernel computes in float32 only, the experts run in {q.dtype.name}"
    return _no_fp8(q)


def _cpu_kernel_machine(q: Query) -> str | None:
    if q.target.platform != "cpu":
        return f"the CPU kernel runs on CPU only, the program targets {q.target.platform}"
    if not q.kernel_built:
        return moe_experts_kernel.unavailable_reason() or "the CPU kernel is not built"
    return None


IMPLS: dict[str, MoeImpl] = {
    impl.name: impl
    for impl in (
        MoeImpl("dense", dispatch_dense, operands=_no_fp8),
        MoeImpl("ragged", dispatch_ragged, operands=_no_fp8),
        MoeImpl("blocked", dispatch_blocked, takes_block_size=True),
        MoeImpl("cpu_kernel", dispatch_cpu_kernel, operands=_cpu_kernel_operands, machine=_cpu_kernel_machine),
    )
}
DISPATCHERS = {name: impl.fn for name, impl in IMPLS.items()}


def auto_order(target: Target) -> tuple[str, ...]:
    """The preference order "auto" walks on `target`; the first implementation that serves the query
    runs. "blocked" serves every query (any platform, dtype, FP8), so it ends every order.

    cpu: "cpu_kernel" (float32, built), then "blocked". XLA:CPU turns ragged_dot into masked dense dots
         (~110-170x the dense-matmul floor for a MoE layer with E 64, k 8; "dense" ~18-28x) while the
         blocked grouped GEMM runs plain [b, D] x [D, 2F] matmuls (1.3-1.5x) and the kernel each
         expert's exact rows through OpenBLAS (benchmarks/README.md).
    tpu: "ragged": ragged_dot lowers to a grouped GEMM that skips the other experts' rows and needs no
         padding, and its (transposed) gradients are grouped GEMMs too.
    gpu: "ragged" on Hopper, where `grouped_matmul` runs JAX's Mosaic-GPU grouped GEMMs (one H200, E 64,
         k 8, bf16: 3.6x the floor, "dense" 7.6x, "blocked" 14x); "dense" on other GPUs, where
         ragged_dot is XLA:GPU's masked dense dot (71x; a 16K-token train step ran out of memory).
    FP8 expert GEMMs: "ragged", "dense" and "cpu_kernel" have none, so every order lands on "blocked".
    """
    if target.platform == "cpu":
        return ("cpu_kernel", "blocked")
    if target.platform == "tpu":
        return ("ragged", "blocked")
    return ("ragged", "blocked") if target.is_hopper else ("dense", "blocked")


class Selection(NamedTuple):
    """The implementation that runs, and why it is not the one requested (None when it is)."""

    impl: str
    reason: str | None = None


def select_impl(requested: str, query: Query) -> Selection:
    """The routed-expert implementation for `requested` ("auto" or a name in IMPLS) and `query`.

    "auto": the first of `auto_order(query.target)` whose predicates pass.
    An explicit name runs when it serves the query. Otherwise:
    - it cannot compute these operands (dtype, FP8): the "auto" choice runs instead, and the
      Selection's reason says why (`dispatch` and the MoE layer warn once with it);
    - it does not exist on this target (CPU kernel not built, or a non-CPU target): RuntimeError
      naming the reason, since the configuration asks for something this machine cannot provide.
    """
    if requested == "auto":
        for name in auto_order(query.target):
            impl = IMPLS[name]
            if impl.operands(query) is None and impl.machine(query) is None:
                return Selection(name)
        raise AssertionError(f"no implementation serves {query}")  # "blocked" serves every query
    if requested not in IMPLS:
        raise ValueError(f"moe_dispatch {requested!r} is not one of {sorted(IMPLS)} or 'auto'")
    impl = IMPLS[requested]
    why = impl.operands(query)
    if why is not None:
        fallback = select_impl("auto", query).impl
        return Selection(fallback, f"moe_dispatch {requested!r} cannot run here: {why}; running {fallback!r}")
    why = impl.machine(query)
    if why is not None:
        raise RuntimeError(f"moe_dispatch {requested!r} is unavailable: {why}")
    return Selection(requested)


def kernel_built() -> bool:
    """Whether the compiled CPU kernel (cpu_kernels/moe_experts.py) can be loaded."""
    return moe_experts_kernel.unavailable_reason() is None


def resolve_impl(requested: str, *, dtype, fp8: str | None, target: Target | None = None) -> str:
    """`select_impl` for the traced program's target (`kernel_target()`, the context mesh's devices)
    and the CPU kernel's build state; warns once per distinct reason when it falls back."""
    target = kernel_target() if target is None else target
    return warn_fallback(select_impl(requested, Query(target, dtype, fp8, kernel_built())))


def warn_fallback(choice: Selection) -> str:
    """The selected implementation's name, after a RuntimeWarning (once per distinct reason) when it
    is not the one requested."""
    if choice.reason is not None:
        _warn_once(choice.reason)
    return choice.impl


def default_dispatch(platform: str) -> str:
    """The "auto" choice for float32 experts without FP8 on `platform` ("cpu", "gpu", "tpu"; for
    "gpu", Hopper or not is judged from this process's first GPU). A shorthand over `select_impl`."""
    target = Target(platform)
    if target.platform == "gpu":
        gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
        target = Target.of_device(gpus[0]) if gpus else target
    return select_impl("auto", Query(target, jnp.float32, None, kernel_built())).impl


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
    `fp8_impl` (None: high precision; "xla", "pallas") puts the expert GEMMs in blockwise FP8.
    `impl` ("auto" or a name in IMPLS) goes through `resolve_impl` for x's dtype and the traced target:
    a request that cannot compute these operands (e.g. "cpu_kernel" on bfloat16, "ragged" with FP8)
    runs the "auto" choice and warns once; one unavailable here raises RuntimeError.
    """
    # The compute dtype: float32 only when x and every expert weight are (what the CPU kernel takes).
    dtype = next((a.dtype for a in (x_ND, *experts) if a.dtype != jnp.float32), jnp.float32)
    chosen = IMPLS[resolve_impl(impl, dtype=dtype, fp8=fp8_impl)]
    if chosen.takes_block_size:
        return chosen.fn(x_ND, ids_Nk, weights_Nk, experts, block_size=block_size, fp8_impl=fp8_impl)
    return chosen.fn(x_ND, ids_Nk, weights_Nk, experts)


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=4)


__all__ = [
    "DISPATCHERS",
    "IMPLS",
    "MoeImpl",
    "Query",
    "Selection",
    "auto_block_size",
    "auto_order",
    "ExpertWeights",
    "default_dispatch",
    "dispatch",
    "kernel_built",
    "resolve_impl",
    "select_impl",
    "warn_fallback",
    "dispatch_blocked",
    "dispatch_cpu_kernel",
    "dispatch_dense",
    "dispatch_ragged",
]
