"""Expert parallelism on 8 emulated CPU devices equals single-device dense dispatch (forward and grads).

The multi-device checks run once, in a subprocess (`python tests/test_expert_parallel.py`), because the
emulated device count must be set before JAX initialises its backend, which other test modules in the
same pytest process will already have done. The worker prints one JSON line of measured errors; the
tests below assert on it case by case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cpu_kernels.moe_experts import available as moe_experts_available

N, D, F, E, K = 64, 16, 8, 16, 4
TOL = 3e-5

# name: (mesh axis sizes, local_impl, routing kind, capacity_factor)
CASES = {
    "expert8": ({"expert": 8}, "blocked", "uniform", None),
    "data2_expert4": ({"data": 2, "expert": 4}, "blocked", "uniform", None),
    "data4_expert2": ({"data": 4, "expert": 2}, "blocked", "uniform", None),
    "expert8_same_k": ({"expert": 8}, "blocked", "same_k", None),
    "data2_expert4_same_k": ({"data": 2, "expert": 4}, "blocked", "same_k", None),
    "data2_model2_expert2": ({"data": 2, "model": 2, "expert": 2}, "blocked", "uniform", None),
    "data2_expert4_dense": ({"data": 2, "expert": 4}, "dense", "uniform", None),
    "data2_expert4_ragged": ({"data": 2, "expert": 4}, "ragged", "uniform", None),
    "data2_expert4_capacity": ({"data": 2, "expert": 4}, "blocked", "uniform", 0.5),
    # cf 1: the receivers run n * k of their P * C * kl slots (expert8 also halves C: ceil(n * k / P) = n / 2)
    "expert8_capacity1_same_k": ({"expert": 8}, "blocked", "same_k", 1.0),
    "data2_expert4_capacity1_ragged": ({"data": 2, "expert": 4}, "ragged", "uniform", 1.0),
}
if moe_experts_available():  # the compiled CPU kernel as each shard's local dispatch
    CASES |= {
        "expert8_cpu_kernel": ({"expert": 8}, "cpu_kernel", "uniform", None),
        "data2_model2_expert2_cpu_kernel": ({"data": 2, "model": 2, "expert": 2}, "cpu_kernel", "uniform", None),
        "data2_expert4_capacity_cpu_kernel": ({"data": 2, "expert": 4}, "cpu_kernel", "uniform", 0.5),
    }
TOKEN_AXES = ("data", "fsdp", "expert")
# Tokens as [B, T, D] (the MoE layer's layout) with T split over context too: name -> mesh axis sizes.
SEQUENCE_B, SEQUENCE_T = 4, 16
SEQUENCE_CASES = {
    "seq_data2_context4": {"data": 2, "context": 4},
    "seq_data2_context2_expert2": {"data": 2, "context": 2, "expert": 2},
    "seq_context2_model2_expert2": {"context": 2, "model": 2, "expert": 2},
}


def expected_keep_mask(ids_Nk, token_shards: int, num_shards: int, capacity: int, receive_capacity: int):
    """numpy: which assignments survive a per-destination send capacity (tokens in order, first come),
    then the receiver's capacity (assignments in arrival order: source shard, token, slot)."""
    import numpy as np

    ids_Nk = np.asarray(ids_Nk)
    keep = np.ones(ids_Nk.shape, bool)
    n, El = ids_Nk.shape[0] // token_shards, E // num_shards
    for s in range(token_shards):
        for p in range(num_shards):
            sent = 0
            for t in range(s * n, (s + 1) * n):
                on_p = ids_Nk[t] // El == p
                if on_p.any():
                    sent += 1
                    if sent > capacity:
                        keep[t] &= ~on_p
    # Token shards are numbered expert-axis fastest, so receiver p of group g hears sources g * P + q.
    for g in range(token_shards // num_shards):
        for p in range(num_shards):
            arrived = 0
            for q in range(num_shards):
                s = g * num_shards + q
                for t in range(s * n, (s + 1) * n):
                    for j in range(ids_Nk.shape[1]):
                        if ids_Nk[t, j] // El == p and keep[t, j]:
                            arrived += 1
                            keep[t, j] = arrived <= receive_capacity
    return keep


def worker() -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from ling_jax.ops.dispatch import ExpertWeights, dispatch
    from ling_jax.ops.expert_parallel import expert_parallel_dispatch_with_stats, receive_capacity, send_capacity

    kx, kw, ki, ke, kc = jax.random.split(jax.random.PRNGKey(0), 5)
    x_ND = jax.random.normal(kx, (N, D))
    weights_Nk = jax.random.uniform(kw, (N, K), minval=0.1, maxval=1.0)
    routings = {
        "uniform": jnp.argsort(jax.random.uniform(ki, (N, E)), axis=1)[:, :K].astype(jnp.int32),
        "same_k": jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (N, K)),  # all tokens -> shard 0 (and 1)
    }
    g1, g2, g3 = jax.random.split(ke, 3)
    experts = ExpertWeights(
        jax.random.normal(g1, (E, D, F)) * D**-0.5,
        jax.random.normal(g2, (E, D, F)) * D**-0.5,
        jax.random.normal(g3, (E, F, D)) * F**-0.5,
    )
    ct_ND = jax.random.normal(kc, (N, D))

    def value_and_grads(fn, x, w, ex):
        y, vjp = jax.vjp(fn, x, w, ex)
        return y, vjp(ct_ND)

    results = {}
    for name, (sizes, impl, kind, capacity_factor) in CASES.items():
        devices = np.asarray(jax.devices()[:8]).reshape(tuple(sizes.values()))
        mesh = Mesh(devices, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))
        ids_Nk = routings[kind]
        token_shards = int(np.prod([sizes.get(a, 1) for a in TOKEN_AXES]))
        P = sizes["expert"]
        capacity = send_capacity(N // token_shards, K, P, capacity_factor)
        received = receive_capacity(N // token_shards, K, P, capacity_factor, capacity, min(K, E // P))
        keep_Nk = jnp.asarray(expected_keep_mask(ids_Nk, token_shards, P, capacity, received))

        def ep(x, w, ex):
            out = expert_parallel_dispatch_with_stats(
                x, ids_Nk, w, ex, mesh=mesh, local_impl=impl, capacity_factor=capacity_factor
            )
            return out.y_ND, out.dropped

        def ref(x, w, ex):
            return dispatch(x, ids_Nk, jnp.where(keep_Nk, w, 0.0), ex, impl="dense")

        @jax.jit
        def run_ep(x, w, ex):
            (y, vjp, dropped) = jax.vjp(ep, x, w, ex, has_aux=True)
            return y, vjp(ct_ND), dropped

        y, grads, dropped = run_ep(x_ND, weights_Nk, experts)
        y_ref, grads_ref = jax.jit(lambda x, w, ex: value_and_grads(ref, x, w, ex))(x_ND, weights_Nk, experts)
        errors = {
            "y": float(jnp.abs(y - y_ref).max()),
            "dx": float(jnp.abs(grads[0] - grads_ref[0]).max()),
            "dweights": float(jnp.abs(grads[1] - grads_ref[1]).max()),
        }
        for field in ExpertWeights._fields:
            errors["d" + field] = float(jnp.abs(getattr(grads[2], field) - getattr(grads_ref[2], field)).max())
        results[name] = {
            "errors": errors,
            "scale": float(jnp.abs(y_ref).max()),
            "dropped": int(dropped),
            "expected_dropped": int((~keep_Nk).sum()),
            "capacity": capacity,
            "receive_capacity": received,
            "received_slots": P * capacity * min(K, E // P),
        }
    results |= sequence_worker(x_ND, weights_Nk, routings["uniform"], experts, ct_ND)
    return results


def sequence_worker(x_ND, weights_Nk, ids_Nk, experts, ct_ND) -> dict:
    """`per_shard_dispatch` on [B, T, D] tokens split over (batch axes, context) against dense dispatch
    on one device, and the token count each device's local dispatch was traced with."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    import ling_jax.ops.expert_parallel as ep_module
    from ling_jax.ops.dispatch import dispatch

    shape = (SEQUENCE_B, SEQUENCE_T)
    rows_seen = []

    def recording_dispatch(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return dispatch(x, *args, **kwargs)

    results = {}
    for name, sizes in SEQUENCE_CASES.items():
        devices = np.asarray(jax.devices()[:8]).reshape(tuple(sizes.values()))
        mesh = Mesh(devices, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))

        def ep(x, w, ex):
            out = ep_module.per_shard_dispatch(
                x.reshape(*shape, D), ids_Nk.reshape(*shape, K), w.reshape(*shape, K), ex, mesh=mesh, impl="blocked"
            )
            return out.y_ND.reshape(N, D)

        rows_seen.clear()
        ep_module.dispatch = recording_dispatch
        try:
            y, vjp = jax.jit(lambda x, w, ex: jax.vjp(ep, x, w, ex))(x_ND, weights_Nk, experts)
            grads = jax.jit(lambda x, w, ex: jax.vjp(ep, x, w, ex)[1](ct_ND))(x_ND, weights_Nk, experts)
        finally:
            ep_module.dispatch = dispatch
        y_ref, vjp_ref = jax.vjp(lambda x, w, ex: dispatch(x, ids_Nk, w, ex, impl="dense"), x_ND, weights_Nk, experts)
        grads_ref = vjp_ref(ct_ND)
        errors = {"y": float(abs(y - y_ref).max())}
        for label, g, g_ref in zip(("dx", "dweights", "dexperts"), grads, grads_ref):
            errors[label] = max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)))
        results[name] = {"errors": errors, "scale": float(abs(y_ref).max()), "local_rows": sorted(set(rows_seen))}
    return results


@pytest.fixture(scope="module")
def results():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"expert-parallel worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_equals_dense(results, name):
    case = results[name]
    assert case["scale"] > 0.1  # the comparison is not between two near-zero outputs
    bad = {k: v for k, v in case["errors"].items() if not v <= TOL}
    assert not bad, f"{name}: max abs errors above {TOL}: {bad}"


@pytest.mark.parametrize("name", sorted(SEQUENCE_CASES))
def test_sequence_split_over_context_equals_dense(results, name):
    """[B, T] tokens with T over context: every device dispatches only its own block (without expert
    parallelism, B * T / (batch shards * context) rows), and values and grads equal one device's."""
    res = results[name]
    for key, err in res["errors"].items():
        assert err <= TOL * max(1.0, res["scale"]), (name, key, err)
    sizes = SEQUENCE_CASES[name]
    if sizes.get("expert", 1) == 1:
        assert res["local_rows"] == [SEQUENCE_B * SEQUENCE_T // (sizes["data"] * sizes["context"])]


def test_dropless_drops_nothing(results):
    for name, (_, _, _, capacity_factor) in CASES.items():
        if capacity_factor is None:
            assert results[name]["dropped"] == 0 == results[name]["expected_dropped"], name


def test_capacity_drops_are_counted(results):
    case = results["data2_expert4_capacity"]
    assert case["capacity"] < N // 8  # the buffers really are smaller than dropless
    assert case["expected_dropped"] > 0
    assert case["dropped"] == case["expected_dropped"]


@pytest.mark.parametrize("name", ["expert8_capacity1_same_k", "data2_expert4_capacity1_ragged"])
def test_receive_capacity_compacts_and_counts(results, name):
    """cf 1: the local dispatch runs n * k rows, not P * n * kl; what does not fit is dropped and counted
    (same_k sends every assignment to shards 0 and 1, so those receivers overflow)."""
    case = results[name]
    assert case["receive_capacity"] == (N // 8) * K < case["received_slots"]  # 8 token shards of n = N / 8
    assert case["dropped"] == case["expected_dropped"]
    if name.endswith("same_k"):
        assert case["expected_dropped"] > 0


if __name__ == "__main__":
    print(json.dumps(worker()))


def test_uneven_splits_are_refused_with_the_sizes():
    """Checked before any shard_map is built, so an abstract mesh (no devices) is enough."""
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh

    from ling_jax.ops.dispatch import ExpertWeights
    from ling_jax.ops.expert_parallel import expert_parallel_dispatch_with_stats, per_shard_dispatch

    experts = ExpertWeights(jnp.zeros((6, 4, 2)), jnp.zeros((6, 4, 2)), jnp.zeros((6, 2, 4)))
    x, ids, w = jnp.zeros((5, 4)), jnp.zeros((5, 2), jnp.int32), jnp.zeros((5, 2))
    with pytest.raises(ValueError, match=r"5 tokens do not split evenly over token axes \('data',\) \(2 shards\)"):
        per_shard_dispatch(x, ids, w, experts, mesh=AbstractMesh((2,), ("data",)), impl="blocked")
    with pytest.raises(ValueError, match=r"6 experts do not split evenly over expert axis 'expert' of size 4"):
        expert_parallel_dispatch_with_stats(x, ids, w, experts, mesh=AbstractMesh((4,), ("expert",)))
    with pytest.raises(ValueError, match=r"5 tokens do not split evenly over token axes \('expert',\) \(3 shards\)"):
        expert_parallel_dispatch_with_stats(x, ids, w, experts, mesh=AbstractMesh((3,), ("expert",)))
    # [B, T] tokens: T over context must split too
    x, ids, w = jnp.zeros((2, 5, 4)), jnp.zeros((2, 5, 2), jnp.int32), jnp.zeros((2, 5, 2))
    mesh = AbstractMesh((2, 2), ("data", "context"))
    with pytest.raises(ValueError, match=r"sequence length 5 does not split evenly over length axes \('context',\)"):
        per_shard_dispatch(x, ids, w, experts, mesh=mesh, impl="blocked")


# A rules table with batch over (data, fsdp) only, experts over fsdp, the expert width unsplit: what a
# change to ling_jax/sharding/rules.py looks like to the routed-expert shard_map.
RULES_VARIANT = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("exp", "fsdp"),
    ("mlp_moe", None),
)


def test_shard_map_specs_follow_the_rules_table():
    import flax.linen as nn
    from jax.sharding import AbstractMesh, PartitionSpec

    from ling_jax.ops.expert_parallel import DispatchAxes, dispatch_axes, shard_specs, token_shards
    from ling_jax.sharding.mesh import MESH_AXES

    mesh = AbstractMesh((2, 2, 2, 1, 2), MESH_AXES)  # context 1
    default = dispatch_axes(mesh)
    assert default == DispatchAxes(("data", "fsdp", "expert"), "expert", "model", ("context",))
    assert shard_specs(*default) == (  # tokens [B, T, ...]: T over context
        PartitionSpec(("data", "fsdp", "expert"), ("context",)),
        PartitionSpec("expert", None, "model"),
        PartitionSpec("expert", "model", None),
    )
    assert token_shards(mesh) == 8
    with nn.logical_axis_rules(RULES_VARIANT):  # the rules in force, as the train step traces under them
        variant = dispatch_axes(mesh)
        assert token_shards(mesh) == 4
    assert variant == DispatchAxes(("data", "fsdp"), "fsdp", None, ()) == dispatch_axes(mesh, RULES_VARIANT)
    assert shard_specs(*variant) == (
        PartitionSpec(("data", "fsdp"), None),
        PartitionSpec("fsdp", None, None),
        PartitionSpec("fsdp", None, None),
    )
    with pytest.raises(ValueError, match="'exp' maps to several mesh axes"):
        dispatch_axes(mesh, (("activation_batch", "data"), ("exp", ("expert", "fsdp")), ("mlp_moe", None)))
    with pytest.raises(KeyError, match="'mlp_moe' is not in the sharding rules"):
        dispatch_axes(mesh, (("activation_batch", "data"), ("exp", "expert")))
