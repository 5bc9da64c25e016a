"""The model's Pallas ops under a multi-device mesh (ling_jax/ops/pallas_target.py): run per batch
shard in a shard_map, they give what one device gives, forward and gradients (the replicated weight's
gradient summed over devices, rows replicated over the "model" axis counted once).

On 8 emulated CPU devices (kernels interpreted), in a subprocess (`python tests/test_pallas_target.py`)
because the device count must be set before JAX initialises. The worker prints one JSON line of
relative errors (and whether a shard_map was traced); the tests assert on it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

TOL = 1e-5  # float32 rounding: the weight gradient is a sum over devices in another order
# name: (mesh axis sizes, rows). 128 rows per shard: the FP8 weight gradient's [128, 1] tiles along the
# rows are then those of one device (with fewer rows per shard they are per shard, as in any
# data-parallel FP8 training, and the result differs by FP8 rounding, not float32 rounding).
CASES = {
    "data4_model2": ({"data": 4, "model": 2}, 512),
    "data2_fsdp2_expert2": ({"data": 2, "fsdp": 2, "expert": 2}, 1024),
    "rows_not_divisible": ({"data": 8}, 60),  # runs replicated on every device
}


def _worker() -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np

    from ling_jax.ops.fp8 import fp8_projection
    from ling_jax.ops.routing import route
    from ling_jax.sharding import build_mesh

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def projection(x_MK, w_KN, ct_MN):
        y, vjp = jax.vjp(
            lambda x, w: fp8_projection(x, w, contract=1, impl="pallas", out_dtype=jnp.float32), x_MK, w_KN
        )
        return (y, *vjp(ct_MN))

    def router(logits_ME, bias_E, ct_Mk):
        (ids, weights), vjp = jax.vjp(
            lambda lg: route(lg, bias_E, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, impl="pallas"),
            logits_ME,
        )
        return ids, weights, vjp((np.zeros(ids.shape, jax.dtypes.float0), ct_Mk))[0]

    results = {}
    for name, (axes, M) in CASES.items():
        mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "model": 1, **axes})
        keys = jax.random.split(jax.random.key(0), 6)
        x = jax.random.normal(keys[0], (M, 160))
        w = jax.random.normal(keys[1], (160, 96)) / 13
        ct = jax.random.normal(keys[2], (M, 96))
        logits = jax.random.normal(keys[3], (M, 16))
        bias = 0.1 * jax.random.normal(keys[4], (16,))
        ct_r = jax.random.normal(keys[5], (M, 2))
        single = [jax.jit(projection)(x, w, ct), jax.jit(router)(logits, bias, ct_r)]
        with jax.set_mesh(mesh):
            text = jax.jit(projection).lower(x, w, ct).as_text() + jax.jit(router).lower(logits, bias, ct_r).as_text()
            sharded = [jax.jit(projection)(x, w, ct), jax.jit(router)(logits, bias, ct_r)]
        case = {"shard_map": "shard_map" in text or "sdy.manual_computation" in text}
        for op, names in ((0, ("y", "dx", "dw")), (1, ("ids", "weights", "dlogits"))):
            for n, a, b in zip(names, sharded[op], single[op]):
                case[n] = rel(a, b) if n != "ids" else float(np.mean(np.asarray(a) != np.asarray(b)))
        results[name] = case
    results["router_BT_data2_context4"] = _sequence_router_case(router, rel)
    results |= _sequence_projection_cases(rel)
    return results


def _sequence_projection_cases(rel) -> dict:
    """FP8 projections of [B, T, K] under data=2 context=4: the Pallas kernel per (batch, sequence)
    shard ([2, 128, K] rows each: the FP8 weight gradient's [128, 1] row tiles are one device's), XLA
    one matmul per row b; both equal one device's."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from ling_jax.ops.fp8 import fp8_projection
    from ling_jax.sharding import build_mesh

    mesh = build_mesh({"data": 2, "fsdp": 1, "expert": 1, "context": 4, "model": 1})
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (4, 512, 160))
    w = jax.random.normal(keys[1], (160, 96)) / 13
    ct = jax.random.normal(keys[2], (4, 512, 96))
    rows = NamedSharding(mesh, PartitionSpec("data", "context"))  # as the train step's activations lie
    cases = {}
    for impl in ("pallas", "xla"):

        def projection(x, w, ct, impl=impl):
            y, vjp = jax.vjp(lambda x, w: fp8_projection(x, w, contract=1, impl=impl, out_dtype=jnp.float32), x, w)
            return (y, *vjp(ct))

        single = jax.jit(projection)(x, w, ct)
        with jax.set_mesh(mesh):
            lowered = jax.jit(projection).lower(jax.device_put(x, rows), w, jax.device_put(ct, rows))
            text, compiled = lowered.as_text(), lowered.compile().as_text()
            sharded = jax.jit(projection)(jax.device_put(x, rows), w, jax.device_put(ct, rows))
        # the shapes all-gathered; before: every device gathered its rows' whole sequence, f32[2,512,160]
        gathered = re.findall(r"= (\S+) all-gather(?:-start)?\(", compiled)
        case = {"gathers_sequence": any(",512," in shape for shape in gathered)}
        if impl == "pallas":
            case["local_shape"] = "2x128x160" in text
        case |= {n: rel(a, b) for n, a, b in zip(("y", "dx", "dw"), sharded, single)}
        cases[f"projection_BT_{impl}_data2_context4"] = case
    return cases


def _sequence_router_case(router, rel) -> dict:
    """The Pallas router on [B, T, E] logits (the MoE layer's layout) under data=2 context=4: one
    kernel call per (batch, sequence) shard of [B/2, T/4] tokens, equal to one device's."""
    import jax
    import numpy as np

    from ling_jax.sharding import build_mesh

    mesh = build_mesh({"data": 2, "fsdp": 1, "expert": 1, "context": 4, "model": 1})
    keys = jax.random.split(jax.random.key(1), 3)
    logits = jax.random.normal(keys[0], (4, 64, 16))
    bias = 0.1 * jax.random.normal(keys[1], (16,))
    ct = jax.random.normal(keys[2], (4, 64, 2))
    single = jax.jit(router)(logits, bias, ct)
    with jax.set_mesh(mesh):
        text = jax.jit(router).lower(logits, bias, ct).as_text()
        sharded = jax.jit(router)(logits, bias, ct)
    case = {"shard_map": "shard_map" in text or "sdy.manual_computation" in text, "local_shape": "2x16x16" in text}
    case["ids"] = float(np.mean(np.asarray(sharded[0]) != np.asarray(single[0])))
    case["weights"], case["dlogits"] = rel(sharded[1], single[1]), rel(sharded[2], single[2])
    return case


@pytest.fixture(scope="module")
def measured() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pallas_router_splits_the_sequence_over_context(measured):
    result = measured["router_BT_data2_context4"]
    assert result.pop("shard_map") and result.pop("local_shape"), "not run per (batch, sequence) shard"
    assert result.pop("ids") == 0.0
    for name, err in result.items():
        assert err <= TOL, (name, err)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_fp8_projection_keeps_the_sequence_split_over_context(measured, impl):
    result = measured[f"projection_BT_{impl}_data2_context4"]
    assert result.pop("local_shape", True), "the Pallas kernel did not run per (batch, sequence) shard"
    assert not result.pop("gathers_sequence"), "the sequence was gathered over the context axis"
    for name, err in result.items():
        assert err <= TOL, (impl, name, err)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pallas_ops_per_shard_equal_one_device(measured, case):
    result = measured[case]
    assert result.pop("shard_map"), "the kernels were not wrapped in a shard_map under the mesh"
    assert result.pop("ids") == 0.0  # the same experts selected
    for name, err in result.items():
        assert err <= TOL, (case, name, err)


if __name__ == "__main__":
    print(json.dumps(_worker()))


def test_row_split_follows_the_rules_table():
    """`per_row_shard` splits rows over the mesh axes the rules table gives "activation_batch"."""
    import flax.linen as nn
    from jax.sharding import AbstractMesh

    from ling_jax.ops.pallas_target import row_axes
    from ling_jax.sharding.mesh import MESH_AXES

    mesh = AbstractMesh((2, 2, 2, 1, 1), MESH_AXES)
    assert row_axes(mesh, 64) == ("data", "fsdp", "expert")
    assert row_axes(mesh, 60) == ()  # 60 rows do not split 8 ways: replicated
    with nn.logical_axis_rules((("activation_batch", ("data", "model")),)):
        assert row_axes(mesh, 64) == ("data",)  # "model" has size 1
        assert row_axes(mesh, 6) == ("data",)
