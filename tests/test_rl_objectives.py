"""ling_jax.rl.policy_loss against an independent NumPy loop over the formula, its gradient against
finite differences, and the clip's zero gradient on the advantage's side."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.rl import DEFAULT_EPS, policy_loss

jax.config.update("jax_enable_x64", False)
B, T = 4, 12


def numpy_objective(logp, old, adv, mask, units, level, eps_low, eps_high):
    """-J by explicit loops: units of response i are the distinct unit keys of its masked tokens."""
    total_tokens = mask.sum()
    J = 0.0
    for i in range(logp.shape[0]):
        groups: dict[int, list[int]] = {}
        for t in range(logp.shape[1]):
            if mask[i, t]:
                key = {"token": t, "sentence": int(units[i, t]), "sequence": 0}[level]
                groups.setdefault(key, []).append(t)
        for ts in groups.values():
            r = np.exp(np.mean([logp[i, t] - old[i, t] for t in ts]))
            J += len(ts) * min(r * adv[i], np.clip(r, 1 - eps_low, 1 + eps_high) * adv[i])
    return -J / total_tokens


def random_case(seed, spread=0.05):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, (B, T))
    logp = old + rng.normal(0, spread, (B, T))
    adv = rng.normal(0, 1, B)
    lengths = [T, T - 3, 5, 1]  # padding, and a one-token response
    mask = np.zeros((B, T), np.float32)
    units = np.zeros((B, T), np.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        # uneven units: cut points drawn at random
        cuts = np.sort(rng.choice(np.arange(1, T), size=3, replace=False))
        units[i] = np.searchsorted(cuts, np.arange(T), side="right")
    return logp, old, adv, mask, units


@pytest.mark.parametrize("level", ["token", "sentence", "sequence"])
@pytest.mark.parametrize("spread", [0.01, 0.3])
def test_matches_numpy(level, spread):
    logp, old, adv, mask, units = random_case(hash((level, spread)) % 1000, spread)
    eps_low, eps_high = DEFAULT_EPS[level]
    loss, stats = policy_loss(
        jnp.asarray(logp, jnp.float32),
        jnp.asarray(old, jnp.float32),
        jnp.asarray(adv, jnp.float32),
        jnp.asarray(mask),
        jnp.asarray(units),
        level=level,
    )
    assert loss.dtype == jnp.float32 and loss.shape == ()
    ref = numpy_objective(logp, old, adv, mask, units, level, eps_low, eps_high)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5, atol=1e-6)
    assert 0.0 <= float(stats["clip_fraction"]) <= 1.0
    if spread == 0.3:  # ratios far outside every default range: some units are clipped
        assert float(stats["clip_fraction"]) > 0


def test_overridden_eps_and_padding_ignored():
    logp, old, adv, mask, units = random_case(7, 0.2)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)] + [jnp.asarray(units)]
    loss, _ = policy_loss(*args, level="sentence", eps_low=0.1, eps_high=0.5)
    np.testing.assert_allclose(
        float(loss), numpy_objective(logp, old, adv, mask, units, "sentence", 0.1, 0.5), rtol=2e-5
    )
    # Values under the padding do not matter.
    garbage = np.where(mask > 0, logp, 123.0)
    loss2, _ = policy_loss(jnp.asarray(garbage, jnp.float32), *args[1:], level="sentence", eps_low=0.1, eps_high=0.5)
    assert float(loss2) == float(loss)


@pytest.mark.parametrize("level", ["token", "sentence", "sequence"])
def test_gradient_matches_finite_differences(level):
    jax.config.update("jax_enable_x64", True)
    try:
        logp, old, adv, mask, units = random_case(3, 0.02)
        # eps wide enough that no unit sits at a clip boundary within the FD step
        f = jax.jit(lambda lp: policy_loss(lp, old, adv, mask, units, level=level, eps_low=0.5, eps_high=0.5)[0])
        g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
        h = 1e-6
        fd = np.zeros_like(logp)
        for i in range(B):
            for t in range(T):
                e = np.zeros_like(logp)
                e[i, t] = h
                fd[i, t] = (float(f(jnp.asarray(logp + e))) - float(f(jnp.asarray(logp - e)))) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9)
        assert np.all(g[mask == 0] == 0)
        assert np.abs(g[mask > 0]).min() > 0  # every response token gets a gradient when nothing is clipped
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("level", ["token", "sentence", "sequence"])
def test_clipped_side_has_zero_gradient(level):
    mask = np.ones((2, 4), np.float32)
    units = np.array([[0, 0, 1, 1]] * 2, np.int32)
    old = np.zeros((2, 4), np.float32)
    eps_low, eps_high = DEFAULT_EPS[level]
    adv = np.array([1.0, -1.0], np.float32)
    # Row 0: A > 0 and ratio above 1 + eps_high; row 1: A < 0 and ratio below 1 - eps_low -> clipped.
    logp = np.array([[1.0] * 4, [-1.0] * 4], np.float32)
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, units, level=level)[0])(jnp.asarray(logp))
    assert np.all(np.asarray(grad) == 0)
    _, stats = policy_loss(jnp.asarray(logp), old, adv, mask, units, level=level)
    assert float(stats["clip_fraction"]) == 1.0
    # The other side of the range is not clipped: A > 0 with a ratio below 1 - eps_low keeps its gradient.
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, units, level=level)[0])(jnp.asarray(-logp))
    assert np.all(np.asarray(grad) != 0)
    _, stats = policy_loss(jnp.asarray(-logp), old, adv, mask, units, level=level)
    assert float(stats["clip_fraction"]) == 0.0


def test_bad_arguments():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="level must be one of"):
        policy_loss(z, z, jnp.zeros(2), z, None, level="word")
    with pytest.raises(ValueError, match="unit_ids_BT"):
        policy_loss(z, z, jnp.zeros(2), z, None, level="sentence")
    with pytest.raises(ValueError, match="advantages_B has shape"):
        policy_loss(z, z, jnp.zeros(3), z, None, level="token")
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(z, z, jnp.zeros(2), z, None, level="token", eps_low=1.5)
