"""Sharded training equals single-device training, and parameters are laid out as the rules say.

The multi-device cases run tests/multidevice/run_steps.py in a subprocess with 8 emulated CPU
devices (the device count is fixed when JAX initialises). It uses the same code path as
`ling_jax.train.loop.run`: build_mesh, check_batch_layout, create_sharded_state, make_train_step.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec
from multidevice.common import finish_run_steps, small_experiment, start_run_steps

MESHES = [{"data": 8}, {"fsdp": 4, "expert": 2}, {"data": 2, "expert": 2, "model": 2}]
SPECS_MESH = {"fsdp": 2, "expert": 2, "model": 2}
RTOL = 1e-4  # float32, 20 steps: only the reduction order differs between meshes


def run_steps_split(spec: dict) -> dict:
    """`spec`'s meshes split over two concurrent subprocesses (each mesh compiles on its own, so this
    halves the wall time on 2 idle cores), results merged."""
    meshes = spec["meshes"]
    halves = [
        dict(spec, meshes=meshes[: (len(meshes) + 1) // 2]),
        {k: v for k, v in dict(spec, meshes=meshes[(len(meshes) + 1) // 2 :]).items() if k != "specs_mesh"},
    ]
    procs = [start_run_steps(h, num_devices=8) for h in halves]
    results = [finish_run_steps(p) for p in procs]
    merged = results[0]
    for other in results[1:]:
        for run, by_mesh in other["runs"].items():
            merged["runs"][run].update(by_mesh)
    return merged


def assert_same_losses(result: dict, steps: int):
    runs = result["runs"][""]
    reference = np.asarray(runs["single"]["loss"])
    assert reference.shape == (steps,) and np.all(np.isfinite(reference))
    assert reference[-1] < reference[0] - 0.3, f"the model did not train: {reference}"
    for sizes in MESHES:
        name = ",".join(f"{k}={v}" for k, v in sizes.items())
        got = np.asarray(runs[name]["loss"])
        rel = np.abs(got - reference) / np.abs(reference)
        print(f"{name:<24} max relative loss difference vs 1 device over {steps} steps: {rel.max():.2e}")
        i = int(rel.argmax())
        assert rel.max() <= RTOL, f"mesh {name}: step {i + 1} loss {got[i]} vs {reference[i]} on 1 device"
        # Expert loads (so the bias updates) are counted over the global batch on every mesh.
        np.testing.assert_allclose(runs[name]["load_max_over_mean"], runs["single"]["load_max_over_mean"], rtol=1e-6)
        assert runs[name]["bias_rule_mismatches"] == 0


@pytest.fixture(scope="module")
def small_model_result() -> dict:
    """20 steps of the small test model on 1 device and on each mesh; specs on SPECS_MESH."""
    return run_steps_split({"steps": 20, "meshes": [{"data": 1}] + MESHES, "specs_mesh": SPECS_MESH})


def test_meshes_give_single_device_losses(small_model_result):
    assert small_model_result["devices"] == 8
    assert_same_losses(small_model_result, steps=20)


@pytest.mark.slow
def test_meshes_give_single_device_losses_tiny_preset():
    """The same on the configs/tiny.py model shapes (16 experts, 4 layers, hidden 128, batch 16 x 64).

    At this size float32 rounding differences grow during training: one device fed the same batches
    with their rows reversed (the same math, summed in another order) drifts from the plain run by
    ~1e-5 (relative) after 20 steps at LR 1e-3 and ~1e-4 at the preset's 3e-3 (Adam turns gradients
    that are zero up to rounding into full-size steps). So this runs at LR 1e-3, where the 1e-4 bound
    tests the sharding and not the optimizer's sensitivity; the noise floor is printed beside it."""
    tiny_shapes = {
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 32,
        "intermediate_size": 384,
        "num_experts": 16,
        "moe_intermediate_size": 64,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 1024,
    }
    train = {"batch_size": 16, "seq_len": 64, "learning_rate": 1e-3}
    floor = start_run_steps(
        {
            "steps": 20,
            "meshes": [{"data": 1}],
            "model": tiny_shapes,
            "train": train,
            "runs": [{"name": "", "reverse_rows": True}],
        }
    )
    result = run_steps_split({"steps": 20, "meshes": [{"data": 1}] + MESHES, "model": tiny_shapes, "train": train})
    reversed_rows = np.asarray(finish_run_steps(floor)["runs"][""]["single"]["loss"])
    reference = np.asarray(result["runs"][""]["single"]["loss"])
    print(
        f"\n1 device, rows reversed: max relative loss difference {np.max(np.abs(reversed_rows / reference - 1)):.2e}"
    )
    assert_same_losses(result, steps=20)


def _spec(leaves: dict, path: str) -> list:
    assert path in leaves, f"{path} not among {sorted(leaves)}"
    return [tuple(a) if isinstance(a, list) else a for a in leaves[path]]


def test_parameters_are_sharded_as_the_rules_say(small_model_result):
    specs = small_model_result["specs"]
    assert specs["mesh"] == {"data": 1, "context": 1, **SPECS_MESH}
    leaves = specs["leaves"]
    W = ("fsdp", "context")  # the model width ("embed"): context devices share the state with fsdp
    moe = "params['moe_stack']['layers']['moe']"
    attn = "params['moe_stack']['layers']['attention']"
    # Routed experts: [layers, E, D, F] / [layers, E, F, D]: experts over 'expert' right after 'layers'.
    assert _spec(leaves, f"{moe}['gate_proj']") == [None, "expert", W, "model"]
    assert _spec(leaves, f"{moe}['up_proj']") == [None, "expert", W, "model"]
    assert _spec(leaves, f"{moe}['down_proj']") == [None, "expert", "model", W]
    assert _spec(leaves, "params['mtp_0']['layer']['moe']['gate_proj']") == ["expert", W, "model"]
    # Embedding [V, D]: vocab over 'model', width over W = ('fsdp', 'context'); lm_head [D, V] the other way round.
    assert _spec(leaves, "params['embedding']") == ["model", W]
    assert _spec(leaves, "params['lm_head']") == [W, "model"]
    # Attention [layers, D, heads, Dh]: heads over 'model'; o_proj [layers, H, Dh, D].
    assert _spec(leaves, f"{attn}['q_proj']['kernel']") == [None, W, "model", None]
    assert _spec(leaves, f"{attn}['k_proj']['kernel']") == [None, W, "model", None]
    assert _spec(leaves, f"{attn}['o_proj']['kernel']") == [None, "model", None, W]
    # Dense FFN [layers, D, F]: width over W = ('fsdp', 'context'), hidden over 'model'.
    assert _spec(leaves, "params['dense_stack']['layers']['mlp']['gate_proj']['kernel']") == [None, W, "model"]
    # The router and the expert biases are replicated over experts (every device routes every token).
    assert _spec(leaves, f"{moe}['router']") == [None, W, None]
    assert _spec(leaves, "expert_bias['moe_stack']['layers']['moe']['bias']") == [None, None]
    assert _spec(leaves, "expert_bias['mtp_0']['layer']['moe']['bias']") == [None]


def test_batch_is_split_over_data_fsdp_expert(small_model_result):
    specs = small_model_result["specs"]
    assert specs["batch_spec"] == [["data", "fsdp", "expert"], "context"]
    assert specs["batch_shape"] == [8, 32]
    assert specs["batch_devices"] == 8
    # 8 rows over data x fsdp x expert = 1 x 2 x 2 = 4 shards of 2 rows (replicated over 'model').
    assert specs["batch_shard_shapes"] == [[2, 32]]


def test_optimizer_state_is_sharded_like_params():
    """Adam's moments take the params' shardings; expert biases and counters are replicated.
    Computed on an abstract mesh: no devices, nothing allocated."""
    from ling_jax.sharding import MESH_AXES
    from ling_jax.train.state import make_optimizer, state_shardings

    exp = small_experiment()
    mesh = AbstractMesh((1, 2, 2, 1, 2), MESH_AXES)  # context 1
    abstract, shardings = state_shardings(exp.model, make_optimizer(exp.train), mesh)
    param_specs = jax.tree.map(lambda s: s.spec, shardings.params)
    adam = [s for s in jax.tree.leaves(shardings.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    assert jax.tree.map(lambda s: s.spec, adam[0].mu) == param_specs
    assert jax.tree.map(lambda s: s.spec, adam[0].nu) == param_specs
    assert shardings.step.spec == PartitionSpec()
    assert all(
        s.spec == PartitionSpec() or all(a is None for a in s.spec) for s in jax.tree.leaves(shardings.expert_bias)
    )
    # Every sharded dimension divides evenly on this mesh for the small model.
    for leaf, sharding in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(shardings.params)):
        for dim, axes in zip(leaf.shape, sharding.spec):
            size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))])) if axes else 1
            assert dim % size == 0, (leaf.shape, sharding.spec)


def test_batch_split_follows_the_rules_table():
    """The input batch spec and the planner's batch split read "activation_batch" from the table."""
    import flax.linen as nn

    from ling_jax.plan.search import mesh_rejection
    from ling_jax.sharding.rules import batch_spec, mesh_axes

    variant = (("activation_batch", ("data", "fsdp")),)
    assert batch_spec() == PartitionSpec(("data", "fsdp", "expert"), "context")
    assert batch_spec(variant) == PartitionSpec(("data", "fsdp"), None)
    with nn.logical_axis_rules(variant):
        assert batch_spec() == PartitionSpec(("data", "fsdp"), None)
    sizes = {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
    assert mesh_axes("activation_batch", sizes) == ("data", "fsdp", "expert")
    exp = small_experiment(train={"batch_size": 4})  # 4 rows over data * fsdp * expert = 8 ways: rejected
    assert "not divisible" in mesh_rejection(exp, sizes)
    with nn.logical_axis_rules(variant):  # batch over data * fsdp = 2 ways only
        assert mesh_rejection(exp, sizes) is None
