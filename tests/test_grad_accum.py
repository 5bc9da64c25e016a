"""Gradient accumulation (`train.microbatches`, ling_jax/train/step.py): k microbatches of b rows
give the loss, gradients, router counts, bias update and next parameters of one batch of k x b rows,
on 1 device (in this process) and on 8 emulated devices (a subprocess running this file as a
script, as tests/test_moe_sharded.py does); bad microbatch counts fail before compiling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multidevice.common import PYTHON, REPO_ROOT, subprocess_env

RTOL = 1e-5  # float32: per leaf, max |accumulated - one batch| / max |one batch|
STEPS = 2
# eps 1e-6 rather than 1e-8: Adam's first update is g / (|g| + eps), whose sign for a gradient entry
# within rounding of zero is arbitrary; a larger eps keeps the update a smooth function of g.
# learning rate 1e-4: Adam's normalised update turns a gradient entry's relative rounding difference
# into a parameter difference of up to lr x that; at 1e-4 a correct accumulation stays below RTOL
# (at 3e-3 it reached 2.7e-5), while a wrong one (e.g. a mean of microbatch means) still moves
# parameters by ~lr, 1e-3 of their scale.
TRAIN = dict(warmup_steps=0, eps=1e-6, learning_rate=1e-4, z_loss_weight=1e-3, sample_tokens=0)
CASES = {  # mesh -> (global batch, microbatches)
    "single": ({"data": 1}, 8, 4),
    "data=2,expert=2,model=2": ({"data": 2, "expert": 2, "model": 2}, 16, 4),
    "fsdp=8": ({"fsdp": 8}, 16, 2),
}


def _max_rel(got, ref) -> float:
    import jax

    errs = jax.tree.map(
        lambda g, r: float(np.abs(np.asarray(g, np.float64) - np.asarray(r)).max() / max(np.abs(r).max(), 1e-30)),
        got,
        ref,
    )
    return max(jax.tree.leaves(errs)) if jax.tree.leaves(errs) else 0.0


def compare(mesh_sizes: dict, batch_size: int, microbatches: int) -> dict:
    """Trains STEPS steps twice from the same state on the same batches, with microbatches=1 and with
    `microbatches`; returns the largest relative differences and the microbatch count traced."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding

    from ling_jax.data import make_train_iterator
    from ling_jax.sharding import MESH_AXES, batch_spec, build_mesh
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
    from ling_jax.train.loop import _global_batch, check_batch_layout, experiment_datasets
    from ling_jax.train.state import create_sharded_state, make_optimizer
    from ling_jax.train.step import loss_and_grads, make_train_step

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from multidevice.common import small_experiment

    axes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
    mesh = build_mesh(axes, jax.devices()[: int(np.prod(list(axes.values())))])
    exps = {k: small_experiment(train=dict(TRAIN, batch_size=batch_size, microbatches=k)) for k in (1, microbatches)}
    data = experiment_datasets(exps[1])
    iterator = make_train_iterator(data.train, global_batch_size=batch_size, seed=0)
    batch_sharding = NamedSharding(mesh, batch_spec())
    batches = [_global_batch(next(iterator), batch_sharding) for _ in range(STEPS)]
    runs = {}
    for k, exp in exps.items():
        check_batch_layout(exp, mesh)
        optimizer = make_optimizer(exp.train)
        state, shardings = create_sharded_state(exp.model, optimizer, mesh, exp.train.seed)
        grads_fn = jax.jit(lambda p, b, x, e=exp: loss_and_grads(p, b, x, model_cfg=e.model, train_cfg=e.train))
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            loss, (metrics, counts, counts_mtp, _), grads = grads_fn(state.params, state.expert_bias, batches[0])
            jaxpr = str(jax.make_jaxpr(grads_fn)(state.params, state.expert_bias, batches[0]))
        run = {
            "loss": float(loss),
            "metrics": {n: np.asarray(metrics[n]) for n in ("ce_loss", "mtp_loss", "z_loss", "tokens")},
            "grads": jax.device_get(grads),
            "counts": np.asarray(counts),
            "counts_mtp": np.asarray(counts_mtp),
            "scans": jaxpr.count("scan["),
            "steps": [],
        }
        step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
        for batch in batches:
            old_bias = jax.device_get(state.expert_bias)
            state, m = step(state, batch)
            run["steps"].append(
                {
                    "loss": float(m["loss"]),
                    "grad_norm": float(m["grad_norm"]),
                    "finite": bool(m["finite"]),
                    "bias_delta": jax.tree.map(
                        lambda n, o: np.asarray(n) - o, jax.device_get(state.expert_bias), old_bias
                    ),
                    "params": jax.device_get(state.params),
                }
            )
        runs[k] = run
    one, acc = runs[1], runs[microbatches]
    return {
        "devices": int(np.prod(list(axes.values()))),
        "scans": [one["scans"], acc["scans"]],
        "loss": abs(acc["loss"] - one["loss"]) / abs(one["loss"]),
        "metrics": _max_rel(acc["metrics"], one["metrics"]),
        "grads": _max_rel(acc["grads"], one["grads"]),
        "counts_equal": bool(
            np.array_equal(acc["counts"], one["counts"]) and np.array_equal(acc["counts_mtp"], one["counts_mtp"])
        ),
        "counts_total": float(one["counts"].sum()),
        "step_loss": max(abs(a["loss"] - o["loss"]) / abs(o["loss"]) for a, o in zip(acc["steps"], one["steps"])),
        "grad_norm": max(
            abs(a["grad_norm"] - o["grad_norm"]) / o["grad_norm"] for a, o in zip(acc["steps"], one["steps"])
        ),
        "finite": all(s["finite"] for r in (one, acc) for s in r["steps"]),
        "bias_delta": max(_max_rel(a["bias_delta"], o["bias_delta"]) for a, o in zip(acc["steps"], one["steps"])),
        "bias_moved": float(max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(one["steps"][0]["bias_delta"]))),
        "params": max(_max_rel(a["params"], o["params"]) for a, o in zip(acc["steps"], one["steps"])),
    }


def _check(result: dict) -> None:
    assert result["scans"][1] > result["scans"][0]  # k > 1 really scans over microbatches
    assert result["counts_total"] > 0 and result["counts_equal"]
    assert result["finite"]
    assert result["bias_moved"] > 0
    for key in ("loss", "metrics", "grads", "step_loss", "grad_norm", "bias_delta", "params"):
        assert result[key] <= RTOL, (key, result[key])


@pytest.mark.slow  # ~100 s on the 2-core host: over the non-slow suite's budget
def test_microbatches_equal_one_batch_on_one_device():
    mesh, batch, k = CASES["single"]
    _check(compare(mesh, batch, k))


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    cases = {name: case for name, case in CASES.items() if name != "single"}
    proc = subprocess.run(
        [PYTHON, str(Path(__file__).resolve()), json.dumps(cases)],
        env=subprocess_env(8),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two meshes x two compiles of the step in a subprocess
@pytest.mark.parametrize("name", [n for n in CASES if n != "single"])
def test_microbatches_equal_one_batch_on_eight_devices(eight_devices, name):
    assert eight_devices[name]["devices"] == 8
    _check(eight_devices[name])


def test_microbatches_must_divide_the_batch():
    from multidevice.common import small_config

    from ling_jax.config import ConfigError
    from ling_jax.train.config import experiment_from_config

    with pytest.raises(ConfigError, match=r"train\.microbatches \(3\) must divide train\.batch_size \(8\)"):
        experiment_from_config(small_config(train=dict(microbatches=3)))


def test_microbatches_must_divide_each_batch_shard():
    """8 rows in 2 microbatches of 4 rows cannot spread over 8 batch shards: refused before compiling."""
    from multidevice.common import small_experiment

    from ling_jax.config import ConfigError
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
    from ling_jax.train.loop import check_batch_layout

    class FakeMesh:  # check_batch_layout reads only the axis sizes
        shape = {"data": 8, "fsdp": 1, "expert": 1, "model": 1}
        axis_names = tuple(shape)

    exp = small_experiment(train=dict(batch_size=8, microbatches=2))
    assert LOGICAL_AXIS_RULES  # the batch shards come from the rules table
    with pytest.raises(ConfigError, match=r"train\.microbatches.*4 rows.*8"):
        check_batch_layout(exp, FakeMesh())


if __name__ == "__main__":
    print(json.dumps({name: compare(*case) for name, case in json.loads(sys.argv[1]).items()}, default=float))
