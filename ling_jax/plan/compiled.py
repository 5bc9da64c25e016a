"""Ahead-of-time lowering and compilation of the REAL train step for a device list (e.g. a TPU
topology described by libtpu on a CPU host): nothing is allocated, every input is a
ShapeDtypeStruct carrying its sharding.

The code path is training's: `make_optimizer`, `state_shardings` over the mesh, and
`make_train_step(...).jitted`, lowered inside `jax.set_mesh(mesh)` + the logical-axis rules
exactly as `make_train_step`'s wrapper calls it.

Figures reported (all per device, as the compiler sees one SPMD partition):
- memory_analysis(): argument, output, temp, generated code and alias bytes. With the state
  donated, outputs alias arguments; the live total is argument + output - alias + temp + code.
- cost_analysis()["flops"]: per device, and XLA counts each while-loop body ONCE (nn.scan
  layers become one loop), so it is compared with the program's matmul FLOPs with loops counted
  once (ling_jax/plan/program_flops.py); the trip-count-correct figure comes from the jaxpr.
A compile that runs out of HBM raises RESOURCE_EXHAUSTED; it is returned as `error`, with the
required bytes the compiler reports.

The routed-expert implementation is chosen by the MoE layer's own selector
(`ling_jax.layers.moe.select_moe_impl`) for the devices the step is traced for, so the compiled
program is the one a run on the target would run (FP8 included); `resolve_dispatch` writes that
choice into the experiment, so the analytic figures describe the same implementation.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import NamedTuple

import flax.linen as nn
import jax
from jax.sharding import NamedSharding

from ling_jax.data.batch import BATCH_DTYPES
from ling_jax.layers.moe import select_moe_impl
from ling_jax.ops.dispatch import warn_fallback
from ling_jax.ops.pallas_target import Target
from ling_jax.plan.analytic import path_text
from ling_jax.plan.program_flops import ProgramFlops, program_flops
from ling_jax.sharding import batch_spec, build_mesh
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
from ling_jax.train.config import Experiment
from ling_jax.train.state import make_optimizer, state_shardings
from ling_jax.train.step import make_train_step

_REQUIRED = re.compile(r"required for [^(]*\(([\d.]+)([KMGTP]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


@dataclasses.dataclass(frozen=True)
class MemoryFigures:
    argument: int
    output: int
    temp: int
    generated_code: int
    alias: int

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.generated_code


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    mesh_shape: dict[str, int]
    microbatches: int  # train.microbatches of the compiled step
    lower_seconds: float
    compile_seconds: float
    program: ProgramFlops  # global matmul FLOPs of the traced step
    memory: MemoryFigures | None = None  # None when the compile ran out of memory
    xla_flops_per_device: float | None = None  # cost_analysis: loop bodies counted once
    shardings: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (path, shape, spec) per state leaf
    error: str | None = None  # the RESOURCE_EXHAUSTED message
    required_bytes: int | None = None  # what the compiler said it needed, when it ran out


def resolve_dispatch(exp: Experiment, target: Target | str) -> Experiment:
    """`exp` with moe_dispatch set to the implementation a run on `target` (a Target, or a platform
    name) runs: "auto" resolved, an explicit request that cannot run there replaced by its fallback
    (with the MoE layer's warning)."""
    target = Target(target) if isinstance(target, str) else target
    impl = warn_fallback(select_moe_impl(exp.model, target))
    if impl == exp.model.moe_dispatch:
        return exp
    return dataclasses.replace(exp, model=exp.model.replace(moe_dispatch=impl))


def with_microbatches(exp: Experiment, microbatches: int) -> Experiment:
    """`exp` with train.microbatches set (validated like a config: it must divide the batch)."""
    if microbatches == exp.train.microbatches:
        return exp
    return dataclasses.replace(exp, train=dataclasses.replace(exp.train, microbatches=microbatches))


def abstract_batch(batch_size: int, seq_len: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's batch (ling_jax/data/batch.py) as sharded abstract [B, T] arrays."""
    sharding = NamedSharding(mesh, batch_spec())
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=sharding) for k, dt in BATCH_DTYPES.items()}


def _spec_text(sharding) -> str:
    spec = getattr(sharding, "spec", None)
    return str(spec) if spec is not None else repr(sharding)


def _required_bytes(message: str) -> int | None:
    match = _REQUIRED.search(message)
    return int(float(match.group(1)) * _UNIT[match.group(2)]) if match else None


class LoweredStep(NamedTuple):
    exp: Experiment  # with moe_dispatch resolved for the devices
    mesh: jax.sharding.Mesh
    abstract: object  # the abstract train state
    traced: object  # jax.stages.Traced
    lowered: jax.stages.Lowered
    lower_seconds: float


def lower_train_step(exp: Experiment, mesh_sizes: dict[str, int], devices) -> LoweredStep:
    """Traces and lowers `exp`'s train step over `devices` with mesh axes `mesh_sizes`, as training does."""
    exp = resolve_dispatch(exp, Target.of_device(devices[0]))
    mesh = build_mesh(mesh_sizes, devices)
    optimizer = make_optimizer(exp.train)
    abstract, shardings = state_shardings(exp.model, optimizer, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = abstract_batch(exp.train.batch_size, exp.train.seq_len, mesh)
    step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        traced = step.jitted.trace(state, batch)
        lowered = traced.lower()
    return LoweredStep(exp, mesh, abstract, traced, lowered, time.perf_counter() - start)


def compile_train_step(exp: Experiment, mesh_sizes: dict[str, int], devices) -> CompiledPlan:
    """Lowers and compiles `exp`'s train step over `devices` with mesh axes `mesh_sizes`."""
    exp, mesh, abstract, traced, lowered, lower_seconds = lower_train_step(exp, mesh_sizes, devices)
    lowered_at = time.perf_counter()
    flops = program_flops(traced.jaxpr)
    base = dict(
        mesh_shape=dict(mesh.shape), microbatches=exp.train.microbatches, lower_seconds=lower_seconds, program=flops
    )
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).strip().splitlines()[0]
        return CompiledPlan(
            **base,
            compile_seconds=time.perf_counter() - lowered_at,
            error=message,
            required_bytes=_required_bytes(message),
        )
    compile_seconds = time.perf_counter() - lowered_at
    stats = compiled.memory_analysis()
    memory = MemoryFigures(
        argument=stats.argument_size_in_bytes,
        output=stats.output_size_in_bytes,
        temp=stats.temp_size_in_bytes,
        generated_code=stats.generated_code_size_in_bytes,
        alias=stats.alias_size_in_bytes,
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    (state_in, _), _ = compiled.input_shardings
    in_shardings = jax.tree.leaves(state_in, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    leaves = tuple((path_text(p), tuple(a.shape), _spec_text(s)) for (p, a), s in zip(paths, in_shardings, strict=True))
    return CompiledPlan(
        **base,
        compile_seconds=compile_seconds,
        memory=memory,
        xla_flops_per_device=float(cost.get("flops", 0.0)),
        shardings=leaves,
    )
