"""Meshes x microbatch counts for a device count, ranked by the analytic plan.

Candidates are every factorization of the devices over the mesh axes such that expert divides
num_experts, model divides num_kv_heads (so every head split is even), context splits the sequence
as the config's own checks allow (`Experiment`: 2 x context pieces for the causal load balance,
the attention kernel's limits), the rules
table can split every state leaf evenly (`plan_state`), and some microbatch count k divides the
global batch into microbatches that split over data*fsdp*expert. Per mesh the smallest such k whose
plan fits the device's HBM is taken (fewest microbatches: the least repeated FSDP traffic and the
largest matmuls), else the k that needs the least memory. Every mesh refused, and why, is kept
(`SearchResult.rejected`) so that a search where nothing fits can say why per candidate.
Ranking: those that fit first, by estimated bytes communicated per step (then memory); after them
the ones that do not fit, smallest estimated memory first.

Communication estimate per device and step (ring collectives move (n-1)/n of the data; first
order, no overlap, used only to order candidates):
- fsdp: parameters all-gathered twice (forward, backward recompute) and gradients
  reduce-scattered once, in the compute dtype, per microbatch: 3 x k x shard bytes x (fsdp - 1).
- data: gradient all-reduce, 2 x gradient bytes x (data - 1) / data.
- model: per layer 2 all-reduces of the [N, D] activations forward and 2 backward.
- context: the keys and values of each attention layer all-gathered forward, again in the
  recompute, and their gradients reduce-scattered: 3 x layers x [N, 2K/model, Dh] x (context - 1).
- expert: the routed experts run per shard (ling_jax/ops/expert_parallel.py): tokens go to
  the shards holding their experts in fixed-size all-to-alls of [expert, C, D] buffers (C = N
  dropless, `send_capacity` with a capacity factor), of which (expert - 1) / expert leave the device;
  per MoE layer the tokens and the outputs forward, again in the backward recompute, and the two
  transposes in the backward: 6 x C x D x (expert - 1).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ling_jax.config import ConfigError
from ling_jax.ops.expert_parallel import send_capacity
from ling_jax.plan.activations import activation_breakdown, activation_bytes
from ling_jax.plan.analytic import StateLayout, StatePlan, plan_state
from ling_jax.sharding.mesh import MESH_AXES
from ling_jax.sharding.rules import mesh_axes
from ling_jax.train.config import Experiment, MeshConfig


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: dict[str, int]
    state: StatePlan
    activations: dict[str, int]  # of one microbatch
    hbm_bytes: int
    microbatches: int = 1
    microbatch_rows: int = 0  # sequences per microbatch (the global batch / microbatches)

    @property
    def accumulator_bytes(self) -> int:
        """The float32 gradient accumulator of the microbatch scan (none with one microbatch)."""
        if self.microbatches == 1:
            return 0
        return sum(
            leaf.bytes_per_device // np.dtype(leaf.dtype).itemsize * 4
            for leaf in self.state.leaves
            if leaf.group == "params"
        )

    @property
    def memory_bytes(self) -> int:
        s = self.state
        return (
            s.params_bytes
            + s.optimizer_bytes
            + s.gradient_bytes
            + self.accumulator_bytes
            + s.other_bytes
            + activation_bytes(self.activations)
        )

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.hbm_bytes


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A mesh (with a microbatch count, when one was tried) that cannot run the config, and why."""

    mesh: dict[str, int]
    microbatches: int | None
    reason: str


@dataclasses.dataclass(frozen=True)
class SearchResult:
    ranked: list[Candidate]  # best first; those that do not fit follow those that do
    rejected: list[Rejection]  # every mesh that cannot run the config at all

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.ranked if c.fits]


def factorizations(n: int, axes: int = len(MESH_AXES)) -> list[tuple[int, ...]]:
    """Every ordered tuple of `axes` positive integers whose product is n."""
    if axes == 1:
        return [(n,)]
    return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, axes - 1)]


def uses_flash_attention(exp: Experiment, platform: str = "tpu") -> bool:
    """Whether the attention core a run on `platform` selects keeps no score matrix (splash / cuDNN)."""
    impl = getattr(exp.model, "attention_impl", "xla")
    if impl == "auto":
        return platform in ("tpu", "gpu")
    return impl in ("splash", "cudnn")


def batch_shards(mesh: dict[str, int]) -> int:
    return math.prod(mesh[a] for a in mesh_axes("activation_batch", mesh))


def context_shards(mesh: dict[str, int]) -> int:
    return math.prod(mesh[a] for a in mesh_axes("activation_length", mesh))


def mesh_rejection(exp: Experiment, mesh: dict[str, int], microbatches: int | None = None) -> str | None:
    """Why this mesh cannot run the config with `microbatches` (default: the config's), None if it
    can (before the per-leaf check)."""
    reason = _model_rejection(exp, mesh)
    if reason:
        return reason
    return microbatch_rejection(exp, mesh, exp.train.microbatches if microbatches is None else microbatches)


def _model_rejection(exp: Experiment, mesh: dict[str, int]) -> str | None:
    m = exp.model
    if m.num_experts % mesh["expert"]:
        return f"expert={mesh['expert']} does not divide num_experts={m.num_experts}"
    if m.num_kv_heads % mesh["model"]:
        return f"model={mesh['model']} does not divide num_kv_heads={m.num_kv_heads}"
    try:  # the config's own checks of a mesh (context splits, the attention kernel's limits)
        dataclasses.replace(exp, mesh=MeshConfig(**mesh))
    except ConfigError as e:
        return str(e)
    return None


def microbatch_rejection(exp: Experiment, mesh: dict[str, int], microbatches: int) -> str | None:
    batch, shards = exp.train.batch_size, batch_shards(mesh)
    if batch % microbatches:
        return f"microbatches={microbatches} does not divide batch {batch}"
    rows = batch // microbatches
    if rows % shards:
        if microbatches > 1:
            cut = f"microbatches of {rows} rows (batch {batch} / {microbatches})"
            return f"{cut} are not divisible by data*fsdp*expert={shards}"
        return f"batch {batch} is not divisible by data*fsdp*expert={shards}"
    return None


def microbatch_options(exp: Experiment, mesh: dict[str, int]) -> list[int]:
    """Every k (ascending) that cuts the batch into microbatches splitting evenly over the batch shards."""
    batch, shards = exp.train.batch_size, batch_shards(mesh)
    return [k for k in range(1, batch // shards + 1) if batch % k == 0 and (batch // k) % shards == 0]


def communication_bytes(exp: Experiment, cand: Candidate) -> float:
    """Estimated bytes each device sends per step (module docstring)."""
    cfg, mesh = exp.model, cand.mesh
    dt = np.dtype(cfg.dtype).itemsize
    fsdp_shards = sum(
        leaf.bytes_per_device / np.dtype(leaf.dtype).itemsize * dt
        for leaf in cand.state.leaves
        if leaf.group == "params" and "fsdp" in str(leaf.spec)
    )
    total = 3 * cand.microbatches * fsdp_shards * (mesh["fsdp"] - 1)
    total += 2 * cand.state.gradient_bytes * (mesh["data"] - 1) / mesh["data"]
    context = context_shards(mesh)
    tokens = exp.train.batch_size * exp.train.seq_len / (batch_shards(mesh) * context)
    layers = cfg.num_layers + cfg.num_mtp_layers
    total += 4 * layers * 2 * tokens * cfg.hidden_size * dt * (mesh["model"] - 1) / mesh["model"]
    if context > 1:
        kv = 2 * math.ceil(cfg.num_kv_heads / mesh["model"]) * cfg.head_dim * dt
        total += 3 * layers * tokens * kv * (context - 1)
    moe_layers = cfg.num_moe_layers + cfg.num_mtp_layers
    if mesh["expert"] > 1:  # rows per destination: n dropless, fewer with a capacity factor
        rows = send_capacity(
            int(tokens / cand.microbatches), cfg.num_experts_per_tok, mesh["expert"], cfg.expert_capacity_factor
        )
        total += 6 * cand.microbatches * moe_layers * rows * cfg.hidden_size * dt * (mesh["expert"] - 1)
    return total


def _candidate(exp: Experiment, state: StatePlan, mesh: dict[str, int], hbm: int, k: int, flash: bool) -> Candidate:
    acts = activation_breakdown(exp.model, exp.train.batch_size, exp.train.seq_len, mesh, microbatches=k, flash=flash)
    return Candidate(mesh, state, acts, hbm, k, exp.train.batch_size // k)


def evaluate_mesh(
    exp: Experiment,
    layout: StateLayout,
    mesh: dict[str, int],
    hbm_bytes: int,
    microbatches: int | None = None,
    platform: str = "tpu",
) -> Candidate:
    """The analytic plan of one mesh with `microbatches` (default: the config's); raises ConfigError
    when the mesh cannot run the config."""
    k = exp.train.microbatches if microbatches is None else microbatches
    reason = mesh_rejection(exp, mesh, k)
    if reason:
        raise ConfigError(reason)
    return _candidate(exp, plan_state(layout, mesh), mesh, hbm_bytes, k, uses_flash_attention(exp, platform))


def best_microbatches(
    exp: Experiment, state: StatePlan, mesh: dict[str, int], hbm: int, options: list[int], flash: bool
) -> Candidate:
    """The fewest microbatches among `options` that fit, else the option needing the least memory."""
    tried = []
    for k in options:
        cand = _candidate(exp, state, mesh, hbm, k, flash)
        if cand.fits:
            return cand
        tried.append(cand)
    return min(tried, key=lambda c: c.memory_bytes)


def fixed_bytes(cand: Candidate) -> int:
    """The part of a candidate's memory that does not shrink with more microbatches: the state, the
    accumulator and one layer's gathered weights."""
    return cand.memory_bytes - per_microbatch_bytes(cand)


def per_microbatch_bytes(cand: Candidate) -> int:
    """The activations that scale with the microbatch's rows (all but the gathered layer weights)."""
    acts = {k: v for k, v in cand.activations.items() if not k.startswith("gathered")}
    return activation_bytes(acts)


def calibrated_microbatches(
    exp: Experiment, cand: Candidate, compiled_bytes: int, platform: str = "tpu"
) -> Candidate | None:
    """After `cand` compiled to `compiled_bytes` per device and did not fit: the same mesh with the
    fewest more microbatches predicted to fit, the per-microbatch activations scaled by what the
    compiler needed beyond the fixed part over the analytic estimate of them (the compiler's
    temporaries are what the analytic model gets wrong, and they shrink with the microbatch); None
    when no microbatch count is predicted to fit."""
    scale = max(1.0, (compiled_bytes - fixed_bytes(cand)) / max(1, per_microbatch_bytes(cand)))
    flash = uses_flash_attention(exp, platform)
    for k in microbatch_options(exp, cand.mesh):
        if k <= cand.microbatches:
            continue
        nxt = _candidate(exp, cand.state, cand.mesh, cand.hbm_bytes, k, flash)
        if fixed_bytes(nxt) + scale * per_microbatch_bytes(nxt) <= cand.hbm_bytes:
            return nxt
    return None


def search_meshes(
    exp: Experiment,
    layout: StateLayout,
    num_devices: int,
    hbm_bytes: int,
    *,
    search_microbatches: bool = True,
    platform: str = "tpu",
) -> SearchResult:
    """Every mesh for `num_devices` (each with its microbatch count), best first, and every refused
    mesh with its reason (module docstring). Without `search_microbatches` only the config's
    train.microbatches is tried."""
    flash = uses_flash_attention(exp, platform)
    found, rejected = [], []
    for sizes in factorizations(num_devices):
        mesh = dict(zip(MESH_AXES, sizes))
        reason = _model_rejection(exp, mesh)
        if reason:
            rejected.append(Rejection(mesh, None, reason))
            continue
        if search_microbatches:
            options = microbatch_options(exp, mesh)
            if not options:
                shards = batch_shards(mesh)
                rejected.append(
                    Rejection(
                        mesh,
                        None,
                        f"no microbatch count cuts batch {exp.train.batch_size} into microbatches divisible by "
                        f"data*fsdp*expert={shards}",
                    )
                )
                continue
        else:
            reason = microbatch_rejection(exp, mesh, exp.train.microbatches)
            if reason:
                rejected.append(Rejection(mesh, exp.train.microbatches, reason))
                continue
            options = [exp.train.microbatches]
        try:
            state = plan_state(layout, mesh)
        except ConfigError as e:
            rejected.append(Rejection(mesh, None, str(e)))
            continue
        found.append(best_microbatches(exp, state, mesh, hbm_bytes, options, flash))

    def rank(c: Candidate):  # fitting meshes by communication; the others by how close they come
        return (0, communication_bytes(exp, c), c.memory_bytes) if c.fits else (1, c.memory_bytes, 0.0)

    return SearchResult(sorted(found, key=rank), rejected)
