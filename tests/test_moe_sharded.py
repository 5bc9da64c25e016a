"""The MoE layer's per-shard dispatch (ling_jax/layers/moe.py) on 8 emulated CPU devices: the layer and
the full train step's loss and gradients under a mesh equal one device, and the per-shard path (the
shard_map, with all-to-all when experts are split) is really the one traced.

Like tests/test_expert_parallel.py, the multi-device work runs once in a subprocess (the emulated
device count is fixed when JAX initialises); it prints one JSON line of measured errors and of what
the traced programs contain, and the tests assert on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from multidevice.common import SMALL_MODEL

from cpu_kernels.moe_experts import available as moe_experts_available

MESHES = {
    "data=8": {"data": 8},
    "fsdp=4,expert=2": {"fsdp": 4, "expert": 2},
    "data=2,expert=2,model=2": {"data": 2, "expert": 2, "model": 2},
}
LAYER_IMPLS = ("blocked", "ragged", "dense") + (("cpu_kernel",) if moe_experts_available() else ())
STEP_IMPLS = ("blocked", "ragged") + (("cpu_kernel",) if moe_experts_available() else ())
LAYER_RTOL = 1e-5  # per array: max abs error / max abs value (float32; observed <= ~1e-6)
RTOL = 1e-4  # the train step's loss and gradients (per leaf, relative to its largest entry), as test_sharding
B, T = 8, 16  # the layer test's tokens: 128, 16 per device on 8 shards


# --------------------------------------------------------------------------- worker (subprocess)
def _mesh(sizes):
    import jax

    from ling_jax.sharding import MESH_AXES, build_mesh

    axes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    return build_mesh(axes, jax.devices()[: int(np.prod(list(axes.values())))])


def _program_marks(jaxpr_text: str) -> dict:
    return {
        "shard_map": "shard_map" in jaxpr_text,
        "all_to_all": "all_to_all" in jaxpr_text,
        "psum_model": "axes=('model',)" in jaxpr_text,
    }


def _max_rel(got, ref) -> float:
    """Largest over leaves of max |got - ref| / max |ref|."""
    import jax

    errs = jax.tree.map(
        lambda g, r: float(np.abs(np.asarray(g) - np.asarray(r)).max() / max(np.abs(r).max(), 1e-30)), got, ref
    )
    return max(jax.tree.leaves(errs))


def layer_worker() -> dict:
    """One MoE layer (8 experts top-2, shared expert): y and d(y . ct)/d(params, x) per mesh and impl."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from ling_jax.config import ModelConfig
    from ling_jax.layers.moe import MoE
    from ling_jax.sharding.rules import BATCH_AXES, LOGICAL_AXIS_RULES, logical_shardings

    results = {}
    base = dict(SMALL_MODEL, vocab_size=64, init_std=0.3)  # the MoE layer alone: MTP and positions unused
    kx, kc, kp, kb = jax.random.split(jax.random.PRNGKey(0), 4)
    x_BTD = jax.random.normal(kx, (B, T, 32))
    ct_BTD = jax.random.normal(kc, (B, T, 32))
    mask_BT = jnp.ones((B, T), bool)
    for impl in LAYER_IMPLS:
        cfg = ModelConfig(**base, moe_dispatch=impl)
        module = MoE(cfg)
        boxed = module.init(kp, x_BTD, mask_BT)
        variables = nn.unbox(boxed)
        bias = 0.1 * jax.random.normal(kb, variables["expert_bias"]["bias"].shape)
        variables = {**variables, "expert_bias": {"bias": bias}}

        def f(params, x):
            y, stats = module.apply({"params": params, "expert_bias": variables["expert_bias"]}, x, mask_BT)
            return jnp.sum(y * ct_BTD), (y, stats.counts_E)

        grad_fn = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
        (_, (y_ref, counts_ref)), grads_ref = jax.jit(grad_fn)(variables["params"], x_BTD)
        results[impl] = {"scale": float(jnp.abs(y_ref).max()), "experts_used": int((counts_ref > 0).sum())}
        for name, sizes in MESHES.items():
            mesh = _mesh(sizes)
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
                p_shard = logical_shardings(nn.get_partition_spec(boxed["params"]), mesh)
                x_shard = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None, None))
                jitted = jax.jit(grad_fn, in_shardings=(p_shard, x_shard))
                params = jax.device_put(variables["params"], p_shard)
                x = jax.device_put(x_BTD, x_shard)
                marks = _program_marks(str(jitted.trace(params, x).jaxpr))
                (_, (y, counts)), grads = jitted(params, x)
            errors = {"y": _max_rel(y, y_ref), "dx": _max_rel(grads[1], grads_ref[1])}
            flat, flat_ref = jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads_ref[0])
            for (path, g), r in zip(flat, flat_ref, strict=True):
                errors["d" + jax.tree_util.keystr(path)] = _max_rel(g, r)
            results[impl][name] = {
                "errors": errors,
                "marks": marks,
                "counts_equal": bool(np.array_equal(np.asarray(counts), np.asarray(counts_ref))),
            }
    # moe_capacity_factor reaches the expert-parallel dispatch, and its drops reach RouterStats.
    mesh = _mesh(MESHES["fsdp=4,expert=2"])
    results["dropped"] = {}
    for cf in (0.0, 0.25):
        module = MoE(ModelConfig(**base, moe_capacity_factor=cf))
        variables = nn.unbox(module.init(kp, x_BTD, mask_BT))
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            x = jax.device_put(x_BTD, NamedSharding(mesh, PartitionSpec(BATCH_AXES, None, None)))
            _, stats = jax.jit(module.apply)(variables, x, mask_BT)
        results["dropped"][str(cf)] = int(stats.dropped)
    return results


def _small_step_setup(impl: str):
    """The small test model (tests/multidevice/common.py) with `impl`, its optimizer and one batch."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice"))
    from common import small_experiment

    from ling_jax.train.state import make_optimizer

    exp = small_experiment(model={"moe_dispatch": impl})
    Bs, Ts, V = exp.train.batch_size, exp.train.seq_len, exp.model.vocab_size
    tokens = np.random.default_rng(0).integers(0, V, size=(Bs, Ts + 1))
    batch = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "segment_ids": np.ones((Bs, Ts), np.int32),
        "positions": np.broadcast_to(np.arange(Ts, dtype=np.int32), (Bs, Ts)).copy(),
        "loss_mask": np.ones((Bs, Ts), np.float32),
    }
    return exp, make_optimizer(exp.train), batch


def trace_worker() -> dict:
    """What the real jitted train step (make_train_step) contains on each mesh, traced from abstract
    inputs (no allocation, no compile)."""
    import flax.linen as nn
    import jax

    from ling_jax.plan.compiled import abstract_batch
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
    from ling_jax.train.state import state_shardings
    from ling_jax.train.step import make_train_step

    results = {}
    for impl in STEP_IMPLS:
        exp, optimizer, _ = _small_step_setup(impl)
        results[impl] = {}
        for name, sizes in {"single": {"data": 1}, **MESHES}.items():
            mesh = _mesh(sizes)
            abstract, shardings = state_shardings(exp.model, optimizer, mesh)
            state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
            batch = abstract_batch(exp.train.batch_size, exp.train.seq_len, mesh)
            step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
                results[impl][name] = _program_marks(str(step.jitted.trace(state, batch).jaxpr))
    return results


def step_worker() -> dict:
    """The train step's loss, gradients and router counts from the same initial state and batch on
    one device and on each mesh (jitted value_and_grad of the step's own `_forward_loss`)."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding

    from ling_jax.sharding import batch_spec
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
    from ling_jax.train.state import create_sharded_state
    from ling_jax.train.step import _forward_loss

    results = {}
    for impl in STEP_IMPLS:
        exp, optimizer, batch_np = _small_step_setup(impl)

        def loss_and_grads(state, batch):
            grad_fn = jax.value_and_grad(_forward_loss, has_aux=True)
            (loss, (_, router, _)), grads = grad_fn(
                state.params, state.expert_bias, batch, exp.model, exp.train.z_loss_weight
            )
            return loss, grads, router.counts_E

        out = {}
        for name, sizes in {"single": {"data": 1}, **MESHES}.items():
            mesh = _mesh(sizes)
            state, _ = create_sharded_state(exp.model, optimizer, mesh, exp.train.seed)
            batch = jax.device_put(batch_np, NamedSharding(mesh, batch_spec()))
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
                loss, grads, counts = jax.jit(loss_and_grads)(state, batch)
            out[name] = {"loss": float(loss), "grads": jax.device_get(grads), "counts": np.asarray(counts)}
        ref = out["single"]
        results[impl] = {
            name: {
                "loss_rel": abs(out[name]["loss"] - ref["loss"]) / abs(ref["loss"]),
                "grads_rel": _max_rel(out[name]["grads"], ref["grads"]),
                "counts_equal": bool(np.array_equal(out[name]["counts"], ref["counts"])),
            }
            for name in MESHES
        }
    return results


# --------------------------------------------------------------------------- tests
def _run_worker(*parts: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice"))
    from common import REPO_ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *parts],
        cwd=REPO_ROOT,
        env=subprocess_env(num_devices=8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"{parts} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fast_results():
    """The MoE layer on every mesh and impl, and the traced train steps (~40 s on 2 cores)."""
    return _run_worker("layer", "trace")


@pytest.fixture(scope="module")
def step_results():
    """Compiled train-step gradients: 1 device + 3 meshes, two impls (~2-3 min on 2 cores)."""
    return _run_worker("step")["step"]


def test_capacity_factor_drops_reach_router_stats(fast_results):
    dropped = fast_results["layer"]["dropped"]
    assert dropped["0.0"] == 0 < dropped["0.25"]


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_moe_layer_per_shard_equals_one_device(fast_results, impl, mesh):
    layer = fast_results["layer"][impl]
    assert layer["scale"] > 0.1 and layer["experts_used"] == 8  # a non-trivial comparison
    case = layer[mesh]
    bad = {k: v for k, v in case["errors"].items() if not v <= LAYER_RTOL}
    assert not bad, f"{impl} on {mesh}: relative errors above {LAYER_RTOL}: {bad}"
    assert case["counts_equal"], "routing counts must be the global ones on every mesh"


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_moe_layer_takes_the_per_shard_path(fast_results, impl, mesh):
    _assert_per_shard(fast_results["layer"][impl][mesh]["marks"], MESHES[mesh])


def _assert_per_shard(marks: dict, sizes: dict):
    assert marks["shard_map"]
    assert marks["all_to_all"] == (sizes.get("expert", 1) > 1)  # experts split: tokens travel
    assert marks["psum_model"] == (sizes.get("model", 1) > 1)  # the experts' F-slices summed over 'model'


@pytest.mark.parametrize("impl", STEP_IMPLS)
def test_train_step_takes_the_per_shard_path(fast_results, impl):
    traced = fast_results["trace"][impl]
    assert not traced["single"]["shard_map"]  # no mesh to split over: today's global dispatch
    for mesh, sizes in MESHES.items():
        _assert_per_shard(traced[mesh], sizes)


@pytest.mark.slow
@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_train_step_per_shard_equals_one_device(step_results, impl, mesh):
    case = step_results[impl][mesh]
    assert case["loss_rel"] <= RTOL, case
    assert case["grads_rel"] <= RTOL, case
    assert case["counts_equal"]


if __name__ == "__main__":
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    workers = {"layer": layer_worker, "trace": trace_worker, "step": step_worker}
    print(json.dumps({part: workers[part]() for part in sys.argv[1:]}))
