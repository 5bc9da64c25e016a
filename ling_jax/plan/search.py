"""Mesh factorizations of a device count, ranked by the analytic plan.

Candidates are every (data, fsdp, expert, model) with product = devices such that expert divides
num_experts, model divides num_kv_heads (so every head split is even), the global batch splits
over data*fsdp*expert, and the rules table can split every state leaf evenly (`plan_state`).
Ranking: those that fit the device's HBM first, by estimated bytes communicated per step (then
memory); after them the ones that do not fit, smallest estimated memory first.

Communication estimate per device and step (ring collectives move (n-1)/n of the data; first
order, no overlap, used only to order candidates):
- fsdp: parameters all-gathered twice (forward, backward recompute) and gradients
  reduce-scattered once, in the compute dtype: 3 x shard bytes x (fsdp - 1).
- data: gradient all-reduce, 2 x gradient bytes x (data - 1) / data.
- model: per layer 2 all-reduces of the [N, D] activations forward and 2 backward.
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
from ling_jax.train.config import Experiment


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: dict[str, int]
    state: StatePlan
    activations: dict[str, int]
    hbm_bytes: int

    @property
    def memory_bytes(self) -> int:
        s = self.state
        return (
            s.params_bytes + s.optimizer_bytes + s.gradient_bytes + s.other_bytes + activation_bytes(self.activations)
        )

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.hbm_bytes


def factorizations(n: int, axes: int = len(MESH_AXES)) -> list[tuple[int, ...]]:
    """Every ordered tuple of `axes` positive integers whose product is n."""
    if axes == 1:
        return [(n,)]
    return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, axes - 1)]


def mesh_rejection(exp: Experiment, mesh: dict[str, int]) -> str | None:
    """Why this mesh cannot run the config (None if it can, before the per-leaf check)."""
    m = exp.model
    if m.num_experts % mesh["expert"]:
        return f"expert={mesh['expert']} does not divide num_experts={m.num_experts}"
    if m.num_kv_heads % mesh["model"]:
        return f"model={mesh['model']} does not divide num_kv_heads={m.num_kv_heads}"
    shards = math.prod(mesh[a] for a in mesh_axes("activation_batch", mesh))
    if exp.train.batch_size % shards:
        return f"batch {exp.train.batch_size} is not divisible by data*fsdp*expert={shards}"
    return None


def communication_bytes(exp: Experiment, cand: Candidate) -> float:
    """Estimated bytes each device sends per step (module docstring)."""
    cfg, mesh = exp.model, cand.mesh
    dt = np.dtype(cfg.dtype).itemsize
    fsdp_shards = sum(
        leaf.bytes_per_device / np.dtype(leaf.dtype).itemsize * dt
        for leaf in cand.state.leaves
        if leaf.group == "params" and "fsdp" in str(leaf.spec)
    )
    total = 3 * fsdp_shards * (mesh["fsdp"] - 1)
    total += 2 * cand.state.gradient_bytes * (mesh["data"] - 1) / mesh["data"]
    tokens = exp.train.batch_size * exp.train.seq_len / math.prod(mesh[a] for a in mesh_axes("activation_batch", mesh))
    layers = cfg.num_layers + cfg.num_mtp_layers
    total += 4 * layers * 2 * tokens * cfg.hidden_size * dt * (mesh["model"] - 1) / mesh["model"]
    moe_layers = cfg.num_moe_layers + cfg.num_mtp_layers
    if mesh["expert"] > 1:  # rows per destination: n dropless, fewer with a capacity factor
        rows = send_capacity(int(tokens), cfg.num_experts_per_tok, mesh["expert"], cfg.expert_capacity_factor)
        total += 6 * moe_layers * rows * cfg.hidden_size * dt * (mesh["expert"] - 1)
    return total


def evaluate_mesh(exp: Experiment, layout: StateLayout, mesh: dict[str, int], hbm_bytes: int) -> Candidate:
    """The analytic plan of one mesh; raises ConfigError when the mesh cannot run the config."""
    reason = mesh_rejection(exp, mesh)
    if reason:
        raise ConfigError(reason)
    state = plan_state(layout, mesh)
    acts = activation_breakdown(exp.model, exp.train.batch_size, exp.train.seq_len, mesh)
    return Candidate(mesh, state, acts, hbm_bytes)


def search_meshes(exp: Experiment, layout: StateLayout, num_devices: int, hbm_bytes: int) -> list[Candidate]:
    """Every valid mesh for `num_devices`, best first (see the module docstring)."""
    found = []
    for sizes in factorizations(num_devices):
        mesh = dict(zip(MESH_AXES, sizes))
        try:
            found.append(evaluate_mesh(exp, layout, mesh, hbm_bytes))
        except ConfigError:
            continue

    def rank(c: Candidate):  # fitting meshes by communication; the others by how close they come
        return (0, communication_bytes(exp, c), c.memory_bytes) if c.fits else (1, c.memory_bytes, 0.0)

    return sorted(found, key=rank)
