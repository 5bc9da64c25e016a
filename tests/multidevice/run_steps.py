"""Trains the small test model for N steps on each of several meshes, with the same code path as
`ling_jax.train.loop.run` (build_mesh, check_batch_layout, create_sharded_state, make_train_step,
the Grain train iterator), and prints one JSON line (see `main`).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/multidevice/run_steps.py '{"steps": 20, "meshes": [{"data": 1}, {"data": 8}]}'

Spec keys: steps, meshes (list of {axis: size}; unnamed axes are 1; a mesh may use fewer devices
than exist), runs (optional list of {"name", "train": {...}, "reverse_rows": bool}: train-config
variants, each trained on every mesh; reverse_rows feeds every batch with its rows reversed),
specs_mesh (optional: also report the PartitionSpecs of every state leaf and of a batch
on that mesh), model / train / data (config overrides on top of common.py's small config).
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import small_experiment  # noqa: E402


def _mesh_name(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "single"


def _axes(sizes: dict) -> dict:
    from ling_jax.sharding import MESH_AXES

    return {a: int(sizes.get(a, 1)) for a in MESH_AXES}


def _mesh(sizes: dict):
    import jax

    from ling_jax.sharding import build_mesh

    axes = _axes(sizes)
    return build_mesh(axes, jax.devices()[: math.prod(axes.values())]), axes


def _leaf_specs(state) -> dict:
    """PartitionSpecs of representative leaves (as lists of axis names), by a readable path."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        out["params" + jax.tree_util.keystr(path)] = [None if a is None else a for a in leaf.sharding.spec]
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.expert_bias):
        out["expert_bias" + jax.tree_util.keystr(path)] = list(leaf.sharding.spec)
    return out


def _bias_stats(expert_bias) -> dict:
    """Per expert-bias leaf: the largest |mean over experts| (per layer) and the largest |bias|."""
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(expert_bias)):
        leaf = np.asarray(leaf, np.float64)
        out[jax.tree_util.keystr(path)] = {
            "max_abs_mean": float(np.abs(leaf.mean(axis=-1)).max()),
            "max_abs": float(np.abs(leaf).max()),
        }
    return out


def _reversed_rows(batch: dict) -> dict:
    """The same batch with its rows in reverse order: the same loss and gradients mathematically,
    summed in another order (a rounding-level perturbation, like a different mesh's reductions)."""
    return {k: v[::-1].copy() for k, v in batch.items()}


def _train(exp, data, sizes: dict, steps: int, reverse_rows: bool = False) -> dict:
    """`steps` train steps on one mesh; per-step loss and load, the check of the bias rule, final biases."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from ling_jax.data import make_train_iterator
    from ling_jax.sharding import batch_spec
    from ling_jax.train.balance import bias_delta
    from ling_jax.train.loop import _global_batch, check_batch_layout
    from ling_jax.train.state import create_sharded_state, make_optimizer
    from ling_jax.train.step import make_train_step

    mesh, _ = _mesh(sizes)
    check_batch_layout(exp, mesh)
    optimizer = make_optimizer(exp.train)
    state, shardings = create_sharded_state(exp.model, optimizer, mesh, exp.train.seed)
    batch_sharding = NamedSharding(mesh, batch_spec())
    iterator = make_train_iterator(data.train, global_batch_size=exp.train.batch_size, seed=exp.train.seed)
    train_step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
    out = {"loss": [], "load_max_over_mean": [], "bias_rule_mismatches": 0}
    for _ in range(steps):
        old_bias = np.asarray(jax.device_get(state.expert_bias["moe_stack"]["layers"]["moe"]["bias"]))
        batch = next(iterator)
        state, metrics = train_step(
            state, _global_batch(_reversed_rows(batch) if reverse_rows else batch, batch_sharding)
        )
        out["loss"].append(float(metrics["loss"]))
        out["load_max_over_mean"].append(float(np.mean(metrics["load_max_over_mean"])))
        # The main stack's biases move by exactly the sign rule on this step's global counts.
        new_bias = np.asarray(jax.device_get(state.expert_bias["moe_stack"]["layers"]["moe"]["bias"]))
        delta = np.asarray(bias_delta(metrics["expert_counts"], exp.train.bias_update_rate))
        out["bias_rule_mismatches"] += int(np.sum(new_bias != (old_bias + delta).astype(np.float32)))
    out["final_bias"] = _bias_stats(state.expert_bias)
    out["skipped_steps"] = int(state.skipped_steps)
    return out


def main(spec: dict) -> dict:
    """{"devices", "runs": {run: {mesh: {"loss", "load_max_over_mean", ...}}}, "specs"}; a run is the
    base config with a run's own "train" changes (spec "runs": [{"name", "train"}], default one run "")."""
    import jax
    from jax.sharding import NamedSharding

    from ling_jax.data import make_train_iterator
    from ling_jax.sharding import batch_spec
    from ling_jax.train.loop import _global_batch, experiment_datasets
    from ling_jax.train.state import create_sharded_state, make_optimizer

    exp = small_experiment(model=spec.get("model"), train=spec.get("train"), data=spec.get("data"))
    data = experiment_datasets(exp)
    result = {"devices": jax.device_count(), "runs": {}}
    for run in spec.get("runs", [{"name": ""}]):
        run_exp = small_experiment(
            model=spec.get("model"), train={**spec.get("train", {}), **run.get("train", {})}, data=spec.get("data")
        )
        result["runs"][run["name"]] = {
            _mesh_name(_axes(sizes)): _train(run_exp, data, sizes, spec["steps"], run.get("reverse_rows", False))
            for sizes in spec.get("meshes", [])
        }
    if spec.get("specs_mesh"):
        mesh, axes = _mesh(spec["specs_mesh"])
        state, _ = create_sharded_state(exp.model, make_optimizer(exp.train), mesh, exp.train.seed)
        iterator = make_train_iterator(data.train, global_batch_size=exp.train.batch_size, seed=exp.train.seed)
        batch = _global_batch(next(iterator), NamedSharding(mesh, batch_spec()))
        result["specs"] = {
            "mesh": axes,
            "leaves": _leaf_specs(state),
            "batch_spec": [list(a) if isinstance(a, tuple) else a for a in batch["inputs"].sharding.spec],
            "batch_shape": list(batch["inputs"].shape),
            "batch_shard_shapes": sorted({tuple(s.data.shape) for s in batch["inputs"].addressable_shards}),
            "batch_devices": len(batch["inputs"].addressable_shards),
        }
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
