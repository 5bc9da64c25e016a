"""The one choice of attention core (`model.attention_impl`): one registry, one fallback order, one
function (`select_impl`) that the attention layer calls, so a plan compiles what a run will run.

    "xla"    the chunked pure-XLA core (ling_jax/ops/attention_core.py): any platform, any shape.
    "splash" JAX's Pallas TPU splash attention kernel (ling_jax/ops/attention_splash.py): TPU, or a
             CPU target in Pallas interpret mode (tests); lengths multiples of 128.
    "cudnn"  cuDNN flash attention through jax.nn (ling_jax/ops/attention_cudnn.py): GPU only.
    "auto"   the first of `auto_order(target)` that serves the query: tpu (splash, xla),
             gpu (cudnn, xla), cpu (xla).

An explicit implementation that cannot take these operands (splash with a length that is no multiple
of 128, cuDNN refusing the shapes or dtypes) falls back to "xla" with a one-time RuntimeWarning
naming the reason; one that does not exist on the target (splash on GPU, cuDNN off GPU) is a
RuntimeError. Attention over a KV cache (decoding) always runs "xla": the kernels here are causal
self-attention over the queries' own slots.

With a context mesh axis of size > 1 (the rules' "activation_length"), self-attention runs through
ling_jax/ops/context_parallel.py with the selected core per device ("cudnn" is not used there: the
zigzag row order needs a mask cuDNN's causal mode cannot express, so it runs "xla").
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax

from ling_jax.ops.attention_core import AttentionMask, causal_query_chunks, dot_product_attention
from ling_jax.ops.attention_cudnn import cudnn_attention
from ling_jax.ops.attention_splash import splash_attention, unsupported_reason
from ling_jax.ops.context_parallel import context_axis, context_parallel_attention
from ling_jax.ops.pallas_target import Target, kernel_target


@dataclasses.dataclass(frozen=True)
class Query:
    """What the choice depends on: the target, query and key lengths, and whether the keys are a KV
    cache (decoding) rather than the queries' own slots."""

    target: Target
    num_queries: int
    num_keys: int
    cached: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """One core: predicates return None (fine) or why it cannot serve a query. `operands`: these
    shapes; `machine`: the target platform."""

    name: str
    operands: Callable[[Query], str | None] = lambda q: None
    machine: Callable[[Query], str | None] = lambda q: None


def _splash_machine(q: Query) -> str | None:
    if q.target.platform == "gpu":
        return "the splash kernel is a TPU (Mosaic) kernel; on GPU use 'cudnn' or 'auto'"
    return None  # TPU, or CPU in interpret mode


def _cudnn_machine(q: Query) -> str | None:
    return None if q.target.platform == "gpu" else f"cuDNN runs on NVIDIA GPUs only, the target is {q.target.platform}"


IMPLS: dict[str, AttentionImpl] = {
    impl.name: impl
    for impl in (
        AttentionImpl("xla"),
        AttentionImpl(
            "splash", operands=lambda q: unsupported_reason(q.num_queries, q.num_keys), machine=_splash_machine
        ),
        AttentionImpl("cudnn", machine=_cudnn_machine),
    )
}


def auto_order(target: Target) -> tuple[str, ...]:
    """The order "auto" walks; "xla" serves every query and ends each one."""
    return {"tpu": ("splash", "xla"), "gpu": ("cudnn", "xla")}.get(target.platform, ("xla",))


class Selection(NamedTuple):
    impl: str
    reason: str | None = None  # why it is not the one requested (None when it is)


def select_impl(requested: str, query: Query) -> Selection:
    """The attention core for `requested` ("auto" or a name in IMPLS) and `query` (module docstring)."""
    if requested != "auto" and requested not in IMPLS:
        raise ValueError(f"model.attention_impl {requested!r} is not one of {sorted(IMPLS)} or 'auto'")
    if query.cached:
        return Selection("xla")
    if requested == "auto":
        for name in auto_order(query.target):
            impl = IMPLS[name]
            if impl.machine(query) is None and impl.operands(query) is None:
                return Selection(name)
        raise AssertionError(f"no attention implementation serves {query}")  # "xla" serves every query
    impl = IMPLS[requested]
    why = impl.machine(query)
    if why is not None:
        raise RuntimeError(f"model.attention_impl={requested!r} is unavailable: {why}")
    why = impl.operands(query)
    if why is not None:
        return Selection("xla", f"model.attention_impl={requested!r} cannot run here: {why}; running 'xla'")
    return Selection(requested)


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=4)


def attention(q_BTHd, k_BSKd, v_BSKd, mask: AttentionMask, *, impl: str, cached: bool) -> jax.Array:
    """Grouped-query attention [B, T, H, Dh] with the core `select_impl` picks for the traced target.

    `cached` False: causal self-attention over the queries' own slots (training, prefill without a
    cache); True: attention over a KV cache (`mask` says which slots each query sees)."""
    target = kernel_target()
    T, S = q_BTHd.shape[1], k_BSKd.shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    ctx = None if cached else context_axis(mesh)
    # under context parallelism each device's kernel sees T / context queries: those decide the core
    choice = select_impl(impl, Query(target, T // mesh.shape[ctx] if ctx else T, S, cached))
    if choice.reason is not None:
        _warn_once(choice.reason)
    interpret = target.platform != "tpu"
    if ctx is not None:
        local = "splash" if choice.impl == "splash" else "xla"
        return context_parallel_attention(q_BTHd, k_BSKd, v_BSKd, mask, local_impl=local, interpret=interpret)
    if choice.impl == "splash":
        return splash_attention(q_BTHd, k_BSKd, v_BSKd, mask.q_segment_BT, mask.kv_segment_BS, interpret=interpret)
    if choice.impl == "cudnn":
        try:
            return cudnn_attention(q_BTHd, k_BSKd, v_BSKd, mask.q_segment_BT, mask.kv_segment_BS)
        except (ValueError, NotImplementedError, RuntimeError, TypeError) as err:
            _warn_once(f"model.attention_impl: cuDNN refused q {q_BTHd.shape} {q_BTHd.dtype}: {err}; running 'xla'")
    # Causal self-attention: chunk the queries (attention_core); a cache is attended whole.
    chunks = 1 if cached else causal_query_chunks(T)
    return dot_product_attention(q_BTHd, k_BSKd, v_BSKd, mask.dense(), query_chunks=chunks)
