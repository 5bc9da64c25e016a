"""WSM checkpoint-merge weights and the pytree merge."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.train import merge_weights as mw
from ling_jax.train.schedule import wsd_schedule

KINDS = ("mean", "linear", "cosine", "1-sqrt")
WINDOWS = (1, 2, 5, 31)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", WINDOWS)
def test_coefficients_sum_to_one_and_are_non_negative(kind, window):
    c = mw.merge_coefficients(kind, window)
    assert c.shape == (window + 1,)
    assert np.all(c > 0)  # every checkpoint in the window contributes
    assert c.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", WINDOWS)
def test_coefficients_reproduce_the_decay_curve(kind, window):
    w = mw.decay_curve(kind, window)
    np.testing.assert_allclose(mw.decay_from_coefficients(mw.merge_coefficients(kind, window)), w, rtol=0, atol=1e-12)
    assert np.all(np.diff(w) < 0) and 0 < w[-1] and w[0] < 1


def test_decay_curves_follow_the_documented_formula():
    k = 3  # 4 checkpoints, w_i = f(i / 4)
    np.testing.assert_allclose(mw.decay_curve("linear", k), [0.75, 0.5, 0.25])
    np.testing.assert_allclose(mw.decay_curve("cosine", k), [0.5 * (1 + math.cos(math.pi * i / 4)) for i in (1, 2, 3)])
    np.testing.assert_allclose(mw.decay_curve("1-sqrt", k), [1 - math.sqrt(i / 4) for i in (1, 2, 3)])


@pytest.mark.parametrize("window", WINDOWS)
def test_mean_is_linear_decay_and_uniform(window):
    uniform = np.full(window + 1, 1.0 / (window + 1))
    np.testing.assert_allclose(mw.merge_coefficients("mean", window), uniform, rtol=1e-12)
    np.testing.assert_allclose(mw.merge_coefficients("linear", window), uniform, rtol=1e-12)


def test_coefficient_shapes_per_kind():
    k = 31
    cos = mw.merge_coefficients("cosine", k)
    np.testing.assert_allclose(cos, cos[::-1], rtol=1e-9)  # symmetric: sin-shaped weights
    assert np.argmax(cos) in (k // 2, k // 2 + 1)
    sq = mw.merge_coefficients("1-sqrt", k)
    assert np.all(np.diff(sq) < 0)  # 1-sqrt weights the oldest checkpoints most
    assert sq[0] == pytest.approx(math.sqrt(1 / (k + 1)))


@pytest.mark.parametrize("kind", ["linear", "cosine", "1-sqrt"])
def test_emulated_decay_matches_wsd_at_checkpoint_boundaries(kind):
    # Checkpoints every `every` steps over a window of k intervals emulate a WSD decay spread over
    # (k + 1) * every steps, read at the k checkpoint boundaries inside the window.
    k, every, peak = 7, 10, 2e-4
    sched = wsd_schedule(peak, warmup_steps=0, total_steps=(k + 1) * every, decay_steps=(k + 1) * every, decay=kind)
    lr_at_boundaries = np.array([float(sched(i * every)) for i in range(1, k + 1)]) / peak
    np.testing.assert_allclose(mw.decay_curve(kind, k), lr_at_boundaries, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_merging_sgd_iterates_is_the_decayed_update_sum(kind):
    # Constant-LR SGD on a quadratic, several steps between checkpoints; the merge must equal
    # theta_n + sum_i w_i * (theta_{n+i} - theta_{n+i-1}) exactly (WSM Eq. 2, oldest first).
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 6))
    h, b = q @ q.T / 6 + np.eye(6), rng.normal(size=6)
    theta, lr, k, steps_per_ckpt = rng.normal(size=6), 0.05, 5, 3
    checkpoints = [theta.copy()]
    for _ in range(k):
        for _ in range(steps_per_ckpt):
            theta = theta - lr * (h @ theta - b)
        checkpoints.append(theta.copy())
    c = mw.merge_coefficients(kind, k)
    merged = mw.merge_pytrees([{"p": jnp.asarray(x, jnp.float32)} for x in checkpoints], c)["p"]
    updates = np.diff(np.stack(checkpoints), axis=0)
    expected = checkpoints[0] + mw.decay_curve(kind, k) @ updates
    np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-5, atol=1e-6)
    if not np.allclose(c, c[::-1]):  # 1-sqrt: the newest-first order must not pass
        wrong = mw.merge_pytrees([{"p": jnp.asarray(x, jnp.float32)} for x in checkpoints], c[::-1])["p"]
        assert not np.allclose(np.asarray(wrong), expected, rtol=1e-5, atol=1e-6)


def test_merge_pytrees_is_the_weighted_sum_and_keeps_dtypes():
    rng = np.random.default_rng(1)
    trees = [
        {
            "w": rng.normal(size=(4, 3)).astype(np.float32),
            "nested": {"b": jnp.asarray(rng.normal(size=5), jnp.bfloat16)},
        }
        for _ in range(3)
    ]
    c = np.array([0.2, 0.3, 0.5])
    out = mw.merge_pytrees(trees, c)
    np.testing.assert_allclose(np.asarray(out["w"]), sum(ci * t["w"] for ci, t in zip(c, trees)), rtol=1e-6)
    assert out["w"].dtype == jnp.float32 and out["nested"]["b"].dtype == jnp.bfloat16
    b32 = sum(np.float32(ci) * np.asarray(t["nested"]["b"], np.float32) for ci, t in zip(c, trees))
    np.testing.assert_array_equal(
        np.asarray(out["nested"]["b"], np.float32), np.asarray(jnp.asarray(b32).astype(jnp.bfloat16), np.float32)
    )


def test_merge_pytrees_errors_name_the_problem():
    a = {"layer": {"kernel": np.zeros((2, 3), np.float32)}}
    with pytest.raises(ValueError, match=r"2 trees but 3 coefficients"):
        mw.merge_pytrees([a, a], [0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\].*\(2, 3\).*\(3, 2\)"):
        mw.merge_pytrees([a, {"layer": {"kernel": np.zeros((3, 2), np.float32)}}], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"structure.*\['layer'\]\['bias'\]"):
        mw.merge_pytrees([a, {"layer": {"bias": np.zeros((2, 3), np.float32)}}], [0.5, 0.5])
    with pytest.raises(ValueError, match="dtype"):
        mw.merge_pytrees([a, {"layer": {"kernel": np.zeros((2, 3), np.float16)}}], [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        mw.merge_pytrees([a, a], [0.5, 0.6])
    with pytest.raises(ValueError, match=">= 0"):
        mw.merge_pytrees([a, a], [1.5, -0.5])
    with pytest.raises(ValueError, match="floating-point"):
        mw.merge_pytrees([{"step": np.int32(3)}, {"step": np.int32(4)}], [0.5, 0.5])


def test_bad_kind_window_and_curve_raise():
    with pytest.raises(ValueError, match="kind"):
        mw.merge_coefficients("ema", 4)
    with pytest.raises(ValueError, match="window"):
        mw.merge_coefficients("mean", -1)
    with pytest.raises(ValueError, match="window"):
        mw.decay_curve("linear", 2.5)
    with pytest.raises(ValueError, match="decay curve"):
        mw.coefficients_from_decay([0.5, 0.7])  # increasing
    with pytest.raises(ValueError, match="decay curve"):
        mw.coefficients_from_decay([1.2, 0.5])
