"""Matmul FLOPs of a traced program, read from its jaxpr (global shapes, nothing compiled).

Why not only `compiled.cost_analysis()`: XLA's cost analysis counts the body of a while loop
once, whatever its trip count (measured: a 4-step and an 8-step `lax.scan` of the same matmul
report the same FLOPs), so for a model whose layers are an `nn.scan` it sees about one layer per
stack. The jaxpr still has each scan's `length`, so here every scan body is multiplied by it.

What is counted: `dot_general` (2 x output elements x contracted size), `ragged_dot_general`
(2 x lhs elements x rhs free size: each row meets one group's weights, so only the useful work) and
the GEMMs inside the CPU MoE kernel's FFI calls (`cpu_kernels.moe_experts.call_matmul_flops`),
everywhere in the program: forward, the backward pass and remat recomputation. Elementwise work
and collectives are not counted. `while` loops with a data-dependent trip count are counted once
(the count is unknown) and reported in `unknown_trip_loops`. `shard_map` bodies see per-shard
shapes, so they are multiplied by the mesh size to stay global.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.extend import core as jex_core

from cpu_kernels.moe_experts import call_matmul_flops


@dataclasses.dataclass(frozen=True)
class ProgramFlops:
    total: float  # global matmul FLOPs, loops at their trip counts
    loops_once: float  # the same with every loop body counted once (what XLA's cost analysis sees)
    unknown_trip_loops: int  # while loops counted once because their trip count is data-dependent


def _dot_flops(eqn) -> float:
    lhs, _ = (v.aval for v in eqn.invars[:2])
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    contracted = math.prod(lhs.shape[d] for d in contract_lhs)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _ragged_dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (_, contract_rhs), (_, batch_rhs) = numbers.dot_dimension_numbers
    not_free = set(contract_rhs) | set(batch_rhs) | set(numbers.rhs_group_dimensions)
    rhs_free = math.prod(n for d, n in enumerate(rhs.shape) if d not in not_free)
    return 2.0 * math.prod(lhs.shape) * rhs_free


def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def _count(jaxpr, scale_loops: bool) -> tuple[float, int]:
    flops, unknown = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops += _dot_flops(eqn)
        elif name == "ragged_dot_general":
            flops += _ragged_dot_flops(eqn)
        elif (
            name == "ffi_call"
            and (kernel := call_matmul_flops(eqn.params.get("target_name", ""), [v.aval.shape for v in eqn.invars]))
            is not None
        ):
            flops += kernel
        elif name == "scan":
            body, n = _count(eqn.params["jaxpr"].jaxpr, scale_loops)
            flops += body * (eqn.params["length"] if scale_loops else 1)
            unknown += n
        elif name == "while":
            body, n = _count(eqn.params["body_jaxpr"].jaxpr, scale_loops)
            flops += body
            unknown += n + 1
        elif name == "cond":
            counted = [_count(b.jaxpr, scale_loops) for b in eqn.params["branches"]]
            flops += max(f for f, _ in counted)
            unknown += max(n for _, n in counted)
        else:
            copies = math.prod(eqn.params["mesh"].shape.values()) if name == "shard_map" else 1
            for value in eqn.params.values():
                for sub in _subjaxprs(value):
                    body, n = _count(sub, scale_loops)
                    flops += copies * body
                    unknown += n
    return flops, unknown


def program_flops(closed_jaxpr) -> ProgramFlops:
    """Matmul FLOPs of `closed_jaxpr` (e.g. `jax.jit(f).trace(*args).jaxpr`)."""
    total, unknown = _count(closed_jaxpr.jaxpr, scale_loops=True)
    once, _ = _count(closed_jaxpr.jaxpr, scale_loops=False)
    return ProgramFlops(total=total, loops_once=once, unknown_trip_loops=unknown)


def traced_jaxpr(fn, *args):
    """The closed jaxpr of `fn(*args)` (`fn` jitted or not), traced on abstract values."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    return jitted.trace(*args).jaxpr
