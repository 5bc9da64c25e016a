"""The composite-key expert sort equals the stable argsort it replaces (ling_jax/ops/expert_sort.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.ops.expert_sort import sort_order


@pytest.mark.parametrize("num_keys, size", [(1, 1), (8, 111), (64, 8192), (256, 3000)])
def test_equals_stable_argsort(num_keys, size):
    rng = np.random.default_rng(num_keys * 1000 + size)
    # many ties, the extreme keys 0 and num_keys (the "no assignment" key of the blocked layout) included
    keys = rng.integers(0, num_keys + 1, size=size).astype(np.int32)
    keys[: min(size, 3)] = num_keys
    got = jax.jit(sort_order, static_argnums=1)(jnp.asarray(keys), num_keys)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argsort(keys, kind="stable"))


def test_all_equal_keys_keep_index_order():
    np.testing.assert_array_equal(np.asarray(sort_order(jnp.full((50,), 3, jnp.int32), 7)), np.arange(50))


def test_falls_back_when_composite_keys_overflow_int32():
    # (num_keys + 1) * M > 2**31: the composite key would overflow, so the stable argsort runs.
    num_keys, size = 2**28, 9
    keys = np.array([5, 2**28, 0, 5, 2**28 - 1, 0, 7, 2**28, 1], np.int32)
    assert (num_keys + 1) * size > 2**31
    np.testing.assert_array_equal(np.asarray(sort_order(jnp.asarray(keys), num_keys)), np.argsort(keys, kind="stable"))
