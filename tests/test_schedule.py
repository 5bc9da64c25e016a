"""WSM / WSD learning-rate schedules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.train.schedule import decay_shape, wsd_schedule, wsm_schedule


def test_wsm_warmup_then_constant():
    sched = wsm_schedule(3.36e-4, warmup_steps=2000)
    assert float(sched(0)) == 0.0
    assert float(sched(500)) == pytest.approx(3.36e-4 / 4, rel=1e-6)
    assert float(sched(1999)) == pytest.approx(3.36e-4 * 1999 / 2000, rel=1e-6)
    for step in (2000, 2001, 10**5, 10**7):
        assert float(sched(step)) == pytest.approx(3.36e-4, rel=1e-6)


def test_wsm_init_lr_and_no_warmup():
    sched = wsm_schedule(1e-3, warmup_steps=10, init_lr=1e-4)
    assert float(sched(0)) == pytest.approx(1e-4)
    assert float(sched(5)) == pytest.approx(5.5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(wsm_schedule(1e-3, warmup_steps=0)(0)) == pytest.approx(1e-3)


def test_wsm_jit_matches_eager_on_a_step_array():
    sched = wsm_schedule(2e-4, warmup_steps=100, init_lr=1e-5)
    steps = jnp.arange(0, 300, 7)
    jitted = jax.jit(jax.vmap(sched))(steps)
    eager = np.array([float(sched(int(s))) for s in steps])
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-6)
    assert np.all(np.diff(eager) >= 0)


@pytest.mark.parametrize("kind, mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_key_steps(kind, mid):
    peak, final = 1e-3, 1e-5
    sched = wsd_schedule(peak, warmup_steps=100, total_steps=1000, decay_steps=200, decay=kind, final_lr=final)
    assert float(sched(50)) == pytest.approx(peak / 2, rel=1e-6)
    assert float(sched(100)) == pytest.approx(peak, rel=1e-6)
    assert float(sched(799)) == pytest.approx(peak, rel=1e-6)
    assert float(sched(800)) == pytest.approx(peak, rel=1e-6)  # decay starts from the peak
    assert float(sched(900)) == pytest.approx(final + (peak - final) * mid, rel=1e-5)
    assert float(sched(1000)) == pytest.approx(final, rel=1e-5)
    assert float(sched(5000)) == pytest.approx(final, rel=1e-5)
    values = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(100, 1200)))
    assert np.all(np.diff(values) <= 1e-12)


def test_decay_shapes_end_points():
    x = np.array([0.0, 1.0])
    for kind in ("linear", "cosine", "1-sqrt"):
        np.testing.assert_allclose(decay_shape(kind, x, xp=np), [1.0, 0.0], atol=1e-15)
    # cosine is symmetric about the midpoint, 1-sqrt drops fastest early on.
    np.testing.assert_allclose(decay_shape("cosine", 0.25, xp=np) + decay_shape("cosine", 0.75, xp=np), 1.0)
    assert decay_shape("1-sqrt", 0.25, xp=np) < decay_shape("linear", 0.25, xp=np)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(peak_lr=0.0, warmup_steps=10), "peak_lr"),
        (dict(peak_lr=1e-3, warmup_steps=-1), "warmup_steps"),
        (dict(peak_lr=1e-3, warmup_steps=1.5), "warmup_steps"),
        (dict(peak_lr=1e-3, warmup_steps=10, init_lr=-1.0), "init_lr"),
    ],
)
def test_wsm_bad_inputs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        wsm_schedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(decay_steps=0), "decay_steps"),
        (dict(decay_steps=950), "decay_steps"),  # overlaps the warmup
        (dict(decay="exp"), "decay"),
        (dict(final_lr=1.0), "final_lr"),
    ],
)
def test_wsd_bad_inputs(kwargs, name):
    base = dict(peak_lr=1e-3, warmup_steps=100, total_steps=1000, decay_steps=200)
    with pytest.raises(ValueError, match=name):
        wsd_schedule(**{**base, **kwargs})
