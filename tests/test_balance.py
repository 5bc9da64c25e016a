"""Aux-loss-free balancing (ling_jax/train/balance.py): the zero-mean sign rule, its wiring into the
train step (the `expert_bias` tree, global counts, no optimizer), and its effect on expert load."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice.common import finish_run_steps, small_experiment, start_run_steps

from ling_jax.model import LingModel
from ling_jax.train.balance import bias_delta, counts_like_bias, load_metrics, update_expert_bias
from ling_jax.train.state import init_state, make_optimizer

U = 1e-3


# --------------------------------------------------------------------------- the rule
def test_bias_delta_sign_rule():
    counts = jnp.array([10.0, 30.0, 20.0, 20.0])  # mean 20: expert 0 under-, expert 1 overloaded
    delta = np.asarray(bias_delta(counts, U))
    np.testing.assert_array_equal(np.sign(delta), [1, -1, 0, 0])
    np.testing.assert_array_equal(delta, np.float32([U, -U, 0, 0]))  # mean sign is 0: no correction


def test_bias_delta_is_zero_mean_when_signs_are_unbalanced():
    # mean 1: three experts below (+1), one above (-1); mean sign 0.5 is subtracted from every entry.
    delta = np.asarray(bias_delta(jnp.array([0.0, 0.0, 0.0, 4.0]), U), np.float64)
    np.testing.assert_allclose(delta, U * np.array([0.5, 0.5, 0.5, -1.5]), rtol=1e-6)
    assert abs(delta.sum()) < 1e-9


def test_bias_delta_ties():
    # Every expert at the mean: no error anywhere, no update.
    np.testing.assert_array_equal(bias_delta(jnp.full((8,), 5.0), U), np.zeros(8))
    # Experts exactly at the mean (error 0, sign 0) only get the zero-mean correction.
    # mean 2: signs [1, 1, -1, 0, 0], mean sign 0.2.
    delta = np.asarray(bias_delta(jnp.array([1.0, 1.0, 4.0, 2.0, 2.0]), U), np.float64)
    np.testing.assert_allclose(delta, U * np.array([0.8, 0.8, -1.2, -0.2, -0.2]), rtol=1e-6)
    assert delta[3] == delta[4]  # equal counts, equal updates


def test_bias_delta_per_layer_and_random_counts_zero_mean():
    counts_LE = jax.random.randint(jax.random.key(0), (5, 16), 0, 100).astype(jnp.float32)
    delta = np.asarray(bias_delta(counts_LE, U), np.float64)
    assert delta.shape == (5, 16)
    np.testing.assert_allclose(delta.mean(axis=-1), 0.0, atol=1e-10)
    for layer in range(5):  # each layer uses only its own counts
        np.testing.assert_array_equal(delta[layer], bias_delta(counts_LE[layer], U))
    # Larger counts never get a larger bias: the update moves load from busy to idle experts.
    for c, d in zip(np.asarray(counts_LE), delta):
        order = np.argsort(c, kind="stable")
        assert np.all(np.diff(d[order]) <= 1e-12)


def test_update_expert_bias_keeps_dtype_and_tree():
    bias = {"a": {"bias": jnp.zeros((2, 4), jnp.float32)}, "b": {"bias": jnp.full((4,), 0.25, jnp.float32)}}
    counts = {"a": {"bias": jnp.array([[1.0, 2, 3, 6], [3, 3, 3, 3]])}, "b": {"bias": jnp.array([0.0, 0, 0, 8])}}
    new = update_expert_bias(bias, counts, U)
    assert jax.tree.structure(new) == jax.tree.structure(bias)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new))
    np.testing.assert_allclose(new["a"]["bias"][1], 0.0)
    np.testing.assert_allclose(new["b"]["bias"], 0.25 + U * np.array([0.5, 0.5, 0.5, -1.5]), rtol=1e-6)


def test_load_metrics():
    m = load_metrics(jnp.array([[4.0, 4, 4, 4], [16, 0, 0, 0]]))
    np.testing.assert_allclose(m["load_max_over_mean"], [1.0, 4.0])
    np.testing.assert_allclose(m["load_cv"], [0.0, np.std([16, 0, 0, 0]) / 4], rtol=1e-6)


# --------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("num_mtp_layers", [0, 2])
def test_counts_tree_matches_the_expert_bias_collection(scan_layers, num_mtp_layers):
    cfg = small_experiment(model={"num_layers": 3, "scan_layers": scan_layers, "num_mtp_layers": num_mtp_layers}).model
    shapes = jax.eval_shape(lambda: LingModel(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    bias = nn.unbox(shapes)["expert_bias"]
    counts = counts_like_bias(
        cfg, jnp.zeros((cfg.num_moe_layers, cfg.num_experts)), jnp.zeros((cfg.num_mtp_layers, cfg.num_experts))
    )
    assert jax.tree.structure(counts) == jax.tree.structure(bias)
    assert [c.shape for c in jax.tree.leaves(counts)] == [b.shape for b in jax.tree.leaves(bias)]


def test_expert_biases_are_outside_params_and_the_optimizer():
    exp = small_experiment()
    optimizer = make_optimizer(exp.train)
    state = nn.unbox(jax.eval_shape(lambda: init_state(exp.model, optimizer, jax.random.key(0))))
    param_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    bias_leaves = jax.tree.leaves(state.expert_bias)
    cfg = exp.model
    assert sum(b.size for b in bias_leaves) == (cfg.num_moe_layers + cfg.num_mtp_layers) * cfg.num_experts
    assert all(b.dtype == jnp.float32 for b in bias_leaves)
    assert not any("bias" in p for p in param_paths), param_paths  # (this model has no linear biases)
    # The optimizer's moments mirror params exactly: there is no slot for an expert bias.
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(state.params)


# --------------------------------------------------------------------------- effect on load
def _balance_runs(rate: float, steps: int) -> dict:
    """The same training with the bias update at `rate` and off, in two concurrent subprocesses."""
    procs = {
        name: start_run_steps(
            {"steps": steps, "meshes": [{"data": 1}], "runs": [{"name": name, "train": {"bias_update_rate": u}}]}
        )
        for name, u in (("on", rate), ("off", 0.0))
    }
    return {name: finish_run_steps(proc)["runs"][name]["single"] for name, proc in procs.items()}


def _check_balance(runs: dict, rate: float, last: int, margin: float):
    on, off = runs["on"], runs["off"]
    load_on = float(np.mean(on["load_max_over_mean"][-last:]))
    load_off = float(np.mean(off["load_max_over_mean"][-last:]))
    print(
        f"\nmax/mean expert load, mean of the last {last} steps: bias update u={rate}: {load_on:.3f}, "
        f"off (u=0): {load_off:.3f}; final loss {on['loss'][-1]:.4f} vs {off['loss'][-1]:.4f}"
    )
    assert load_on < load_off - margin
    # Same seed and data: both runs start from the same loss (two compiled programs, so to rounding).
    assert on["loss"][0] == pytest.approx(off["loss"][0], rel=1e-6)
    # Every step moved the biases by exactly the sign rule (nothing else touches them) ...
    assert on["bias_rule_mismatches"] == 0 and off["bias_rule_mismatches"] == 0
    for path, stats in on["final_bias"].items():
        assert stats["max_abs"] > 0, path  # ... they did move ...
        assert stats["max_abs_mean"] <= 1e-6, (path, stats)  # ... and their mean over experts stays 0.
    for path, stats in off["final_bias"].items():  # with u = 0 they stay exactly at their initial zeros
        assert stats["max_abs"] == 0.0, (path, stats)


def test_bias_update_balances_expert_load():
    """Small model, u = 1e-2 (so that 80 steps suffice), against u = 0 from the same seed and data."""
    _check_balance(_balance_runs(1e-2, steps=80), 1e-2, last=10, margin=1.0)


@pytest.mark.slow
def test_bias_update_balances_expert_load_default_rate():
    """The spec's u = 1e-3 (Ling 2.0's rate) needs a few hundred steps to undo the early routing collapse."""
    _check_balance(_balance_runs(1e-3, steps=300), 1e-3, last=25, margin=0.5)
