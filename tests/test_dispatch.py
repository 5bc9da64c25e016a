"""Every dispatch path equals the dense reference (forward and gradients), on even and skewed loads."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels.moe_experts import available as moe_experts_available
from cpu_kernels.moe_experts import unavailable_reason
from ling_jax.config import MOE_DISPATCHES, ModelConfig
from ling_jax.layers.moe import MoE
from ling_jax.ops import blocked_layout as bl
from ling_jax.ops.dispatch import DISPATCHERS, ExpertWeights, auto_block_size, default_dispatch, dispatch
from ling_jax.ops.grouped_matmul import is_hopper


def make_experts(key, E, D, F, dtype=jnp.float32) -> ExpertWeights:
    kg, ku, kd = jax.random.split(key, 3)
    return ExpertWeights(
        (jax.random.normal(kg, (E, D, F)) * D**-0.5).astype(dtype),
        (jax.random.normal(ku, (E, D, F)) * D**-0.5).astype(dtype),
        (jax.random.normal(kd, (E, F, D)) * F**-0.5).astype(dtype),
    )


def routing(kind: str, key, N: int, E: int, k: int) -> jax.Array:
    """ids [N, k] int32 for a named load pattern."""
    if kind == "uniform":  # k distinct random experts per token
        return jnp.argsort(jax.random.uniform(key, (N, E)), axis=1)[:, :k].astype(jnp.int32)
    if kind == "one_expert":  # every slot of every token on expert 1 (repeated ids are legal input)
        return jnp.ones((N, k), jnp.int32)
    if kind == "same_k":  # every token on the same k experts, all others empty
        return jnp.broadcast_to(jnp.arange(E - k, E, dtype=jnp.int32), (N, k))
    if kind == "half_empty":  # only the even experts are used
        return 2 * (jnp.argsort(jax.random.uniform(key, (N, E // 2)), axis=1)[:, :k].astype(jnp.int32))
    if kind == "skewed":  # expert 0 in slot 0 of 3/4 of the tokens, the rest random
        ids = routing("uniform", key, N, E, k)
        hot = jnp.arange(N) % 4 != 0
        has0 = (ids == 0).any(axis=1)
        return jnp.where((hot & ~has0)[:, None] & (jnp.arange(k) == 0), 0, ids)
    raise ValueError(kind)


def inputs(N=37, D=16, F=24, E=8, k=3, kind="uniform", seed=0, dtype=jnp.float32):
    kx, kw, ki, ke = jax.random.split(jax.random.PRNGKey(seed), 4)
    x_ND = jax.random.normal(kx, (N, D)).astype(dtype)
    weights_Nk = jax.random.uniform(kw, (N, k), minval=0.1, maxval=1.0)
    return x_ND, routing(kind, ki, N, E, k), weights_Nk, make_experts(ke, E, D, F, dtype)


@functools.partial(jax.jit, static_argnames=("impl", "block_size"))
def _value_and_grads(x_ND, ids_Nk, weights_Nk, experts, ct_ND, *, impl, block_size):
    y, vjp = jax.vjp(
        lambda x, w, ex: dispatch(x, ids_Nk, w, ex, impl=impl, block_size=block_size), x_ND, weights_Nk, experts
    )
    return y, vjp(ct_ND.astype(y.dtype))


def value_and_grads(impl, x_ND, ids_Nk, weights_Nk, experts, block_size=None):
    """y and the gradients of <y, ct> (fixed random ct) w.r.t. x, weights and the expert weights.
    ids are a traced argument, so routings of the same shapes share one compilation."""
    ct_ND = jax.random.normal(jax.random.PRNGKey(123), x_ND.shape, jnp.float32)
    return _value_and_grads(x_ND, ids_Nk, weights_Nk, experts, ct_ND, impl=impl, block_size=block_size)


def assert_trees_close(got, want, atol, rtol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol)


@functools.cache
def dense_reference(kind):
    return value_and_grads("dense", *inputs(kind=kind))


# N = 37 tokens, k = 3: 111 assignments, never a multiple of the block sizes used here.
CASES = [("blocked", None, kind) for kind in ("uniform", "one_expert", "same_k", "half_empty", "skewed")]
CASES += [("blocked", b, "skewed") for b in (1, 5, 64)]
CASES += [("ragged", None, kind) for kind in ("uniform", "half_empty")]
CASES += [("cpu_kernel", None, kind) for kind in ("uniform", "one_expert", "same_k", "half_empty", "skewed")]

needs_kernel = pytest.mark.skipif(not moe_experts_available(), reason=str(unavailable_reason()))


@pytest.mark.parametrize("impl,block_size,kind", CASES)
def test_paths_equal_dense(impl, block_size, kind):
    if impl == "cpu_kernel" and not moe_experts_available():
        pytest.skip(str(unavailable_reason()))
    got = value_and_grads(impl, *inputs(kind=kind), block_size=block_size)
    assert_trees_close(got, dense_reference(kind), atol=2e-5, rtol=2e-5)


def test_blocked_grads_are_not_trivially_zero():
    args = inputs(kind="skewed")
    y, (dx, dw, dex) = value_and_grads("blocked", *args)
    for g in (y, dx, dw, *dex):
        assert float(jnp.abs(g).max()) > 1e-3


@pytest.mark.parametrize("impl", ["blocked", pytest.param("cpu_kernel", marks=needs_kernel)])
def test_empty_slots_contribute_nothing(impl):
    """Out-of-range ids (expert parallelism's unused slots) add nothing and get no weight gradient."""
    x_ND, ids_Nk, weights_Nk, experts = inputs(kind="uniform")
    empty = (jnp.arange(ids_Nk.shape[0]) % 3 == 0)[:, None] & (jnp.arange(ids_Nk.shape[1]) > 0)
    ids_holey = jnp.where(empty, -1, ids_Nk)
    ids_holey = ids_holey.at[1].set(8)  # == E: out of range at the top as well
    weights_kept = jnp.where(ids_holey >= 0, weights_Nk, 0.0).at[1].set(0.0)
    want = value_and_grads("dense", x_ND, jnp.where(ids_holey >= 0, ids_holey, 0) % 8, weights_kept, experts)
    y, (dx, dw, dex) = value_and_grads(
        impl, x_ND, ids_holey, weights_Nk, experts, block_size=4 if impl == "blocked" else None
    )
    assert_trees_close((y, dx, dex), (want[0], want[1][0], want[1][2]), atol=2e-5, rtol=2e-5)
    real = (ids_holey >= 0) & (ids_holey < 8)
    np.testing.assert_allclose(np.where(real, dw, 0.0), np.where(real, want[1][1], 0.0), atol=2e-5, rtol=2e-5)
    assert not np.any(np.where(real, 0.0, dw))


def test_bf16_smoke():
    x, ids, w, ex = inputs(kind="skewed")
    ex16 = ExpertWeights(*(a.astype(jnp.bfloat16) for a in ex))
    got = value_and_grads("blocked", x.astype(jnp.bfloat16), ids, w, ex16)
    assert got[0].dtype == jnp.bfloat16 and got[1][2].gate_EDF.dtype == jnp.bfloat16
    for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(dense_reference("skewed")), strict=True):
        err = float(jnp.abs(g.astype(jnp.float32) - want).max())
        assert err <= 2e-2 * float(jnp.abs(want).max()), (g.shape, err)  # bf16: ~3 significant digits


@pytest.mark.parametrize("kind", ["uniform", "one_expert", "half_empty"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_blocked_layout_invariants(kind, block_size):
    N, E, k = 37, 8, 3
    ids_Nk = routing(kind, jax.random.PRNGKey(1), N, E, k)
    lay = jax.tree.map(np.asarray, jax.jit(bl.blocked_layout, static_argnums=(1, 2))(ids_Nk, E, block_size))
    M, R = N * k, lay.row_token_R.shape[0]
    assert R == block_size * bl.max_blocks(M, E, block_size)
    # pos and row_assign are inverse permutations between assignments and non-padding rows.
    np.testing.assert_array_equal(lay.row_assign_R[lay.pos_M], np.arange(M))
    assert (lay.row_assign_R < M).sum() == M
    ids_M = np.asarray(ids_Nk).reshape(-1)
    row_expert = np.repeat(lay.block_expert_Q, block_size)
    np.testing.assert_array_equal(row_expert[lay.pos_M], ids_M)  # every row sits in a block of its expert
    np.testing.assert_array_equal(lay.row_token_R[lay.pos_M], np.arange(M) // k)
    assert np.all(np.diff(lay.block_expert_Q) >= 0)
    used = int(lay.num_used_blocks)
    assert used == sum(-(-c // block_size) for c in np.bincount(ids_M, minlength=E))
    assert np.all(lay.row_assign_R[used * block_size :] == M)  # skipped blocks hold padding only


def test_max_blocks_bound_is_tight():
    # 8 experts with 1 assignment each and b = 4 need 8 blocks; the bound (8 + 8 * 3) // 4 = 8.
    assert bl.max_blocks(8, 8, 4) == 8
    ids = jnp.arange(8, dtype=jnp.int32)[:, None]
    assert int(bl.blocked_layout(ids, 8, 4).num_used_blocks) == 8
    assert bl.max_blocks(3, 64, 128) == 3  # at most M non-empty experts


def test_auto_block_size():
    assert auto_block_size(8192 * 8, 64) == 256  # capped
    assert auto_block_size(1024 * 8, 64) == 64  # 128 rows per expert on average
    assert auto_block_size(111, 8) == 8
    assert auto_block_size(0, 8) == 8


def test_default_dispatch_and_registry():
    assert default_dispatch("cpu") == ("cpu_kernel" if moe_experts_available() else "blocked")
    assert default_dispatch("TPU") == "ragged"
    assert default_dispatch("gpu") == ("ragged" if is_hopper() else "dense")
    with pytest.raises(ValueError, match="platform"):
        default_dispatch("abacus")
    assert set(DISPATCHERS) <= set(MOE_DISPATCHES)
    with pytest.raises(ValueError, match="moe_dispatch"):
        dispatch(*inputs(), impl="nope")


@pytest.mark.parametrize("impl", ["blocked", pytest.param("cpu_kernel", marks=needs_kernel)])
def test_moe_module_equals_dense(impl):
    """The MoE block runs with moe_dispatch `impl` (config plumbing); gradients are covered above."""
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        num_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=24,
        num_mtp_layers=0,
    )
    x_BTD = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 32))
    mask_BT = jnp.ones((2, 9), bool)
    variables = nn.unbox(jax.jit(MoE(cfg).init)(jax.random.PRNGKey(1), x_BTD, mask_BT))
    variables["params"] = jax.tree.map(lambda p: p * 30.0, variables["params"])  # non-trivial routing
    want, stats = jax.jit(MoE(cfg.replace(moe_dispatch="dense")).apply)(variables, x_BTD, mask_BT)
    got, _ = jax.jit(MoE(cfg.replace(moe_dispatch=impl)).apply)(variables, x_BTD, mask_BT)
    assert float(stats.counts_E.max()) > float(stats.counts_E.min())  # routing is not uniform
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
