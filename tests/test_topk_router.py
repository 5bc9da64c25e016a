"""Tests of pallas_kernels.topk_router: selection, weights and gradients, kernel vs reference.

Expert ids must match EXACTLY (including on deliberate ties, which go to the lowest index);
weights agree within 1e-6; gradients w.r.t. the logits agree between impls and with jax.grad
of a plain formulation within 1e-6. The Pallas kernels run in interpret mode on CPU.
"""

import functools
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common as pallas_common
from pallas_kernels.topk_router import RouterKernelConfig, sigmoid_topk_route

# (num_tokens, num_experts, top_k, n_group, topk_group): Ling 2.0's 256/8/8/4 routing, a
# smaller grouped one, all groups kept, no grouping with top_k = 1 (no normalization), and a
# token count spanning two kernel blocks with a partial last one.
CASES = [(64, 256, 8, 8, 4), (37, 64, 6, 4, 2), (50, 32, 4, 8, 8), (20, 16, 1, 1, 1), (300, 128, 8, 8, 4)]
SCALE = 2.5
TIE_KINDS = ["random", "ties"]


def make_logits(kind, t, e, n_group, seed=0):
    """Logits [T, E] and bias [E]; "ties" has coarse values, duplicated columns and groups."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((t, e)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(e)).astype(np.float32)
    if kind == "ties":
        logits = np.round(logits * 2) / 2  # few distinct values: many equal scores per row
        logits[:, 5] = logits[:, 3]
        group = e // n_group
        if n_group > 1:
            logits[: t // 2, group : 2 * group] = logits[: t // 2, :group]  # equal group scores
        bias = np.zeros(e, np.float32)
        bias[e // 2 :] = 0.25  # exact ties between biased scores stay exact
    return logits, bias


def route(logits, bias, case, impl, config=None):
    _, _, top_k, n_group, topk_group = case
    return sigmoid_topk_route(
        jnp.asarray(logits),
        jnp.asarray(bias),
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=SCALE,
        impl=impl,
        config=config,
    )


@functools.partial(jax.jit, static_argnames=("case", "impl"))
def route_and_grads(logits, bias, r, *, case, impl):
    """(ids, weights, d/dlogits and d/dbias of sum(weights * r)); one compile per case/impl."""

    def loss(logits, bias):
        ids, weights = route(logits, bias, case, impl)
        return jnp.sum(weights * r), (ids, weights)

    (_, (ids, weights)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(logits, bias)
    return ids, weights, *grads


def random_cotangent(case, seed=2):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((case[0], case[2])), jnp.float32)


def numpy_route(logits, bias, case):
    """Independent selection in numpy (stable argsort = lowest index first on ties)."""
    t, e, top_k, n_group, topk_group = case
    s = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)), np.float32)  # the spec's sigmoid
    biased = s + bias[None, :]
    grouped = biased.reshape(t, n_group, e // n_group)
    top2 = -np.sort(-grouped, axis=-1)[..., :2]
    group_scores = top2[..., 0] + top2[..., 1]
    kept_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
    keep = np.zeros((t, n_group), bool)
    np.put_along_axis(keep, kept_groups, True, axis=-1)
    masked = np.where(np.repeat(keep, e // n_group, axis=1), biased, -np.inf)
    ids = np.argsort(-masked, axis=-1, kind="stable")[:, :top_k]
    chosen = np.take_along_axis(s, ids, axis=-1)
    if top_k > 1:
        chosen = chosen / (chosen.sum(-1, keepdims=True) + np.float32(1e-20))
    return ids, chosen * np.float32(SCALE)


def plain_weights(logits, ids, top_k):
    """Differentiable weights for fixed ids, written plainly for jax.grad."""
    chosen = jnp.take_along_axis(jax.nn.sigmoid(logits), ids, axis=-1)
    if top_k > 1:
        chosen = chosen / (jnp.sum(chosen, -1, keepdims=True) + 1e-20)
    return chosen * SCALE


@pytest.mark.parametrize("kind", TIE_KINDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference_and_numpy(case, kind):
    logits, bias = make_logits(kind, case[0], case[1], case[3])
    ids_np, weights_np = numpy_route(logits, bias, case)
    r = random_cotangent(case)
    ids_x, weights_x, _, _ = route_and_grads(logits, bias, r, case=case, impl="xla")
    ids_p, weights_p, _, _ = route_and_grads(logits, bias, r, case=case, impl="pallas")
    assert ids_p.dtype == ids_x.dtype == jnp.int32
    assert weights_p.dtype == weights_x.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids_x), ids_np)
    np.testing.assert_array_equal(np.asarray(ids_p), np.asarray(ids_x))
    np.testing.assert_allclose(np.asarray(weights_x), weights_np, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights_p), np.asarray(weights_x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_routing_properties(case):
    t, e, top_k, n_group, topk_group = case
    logits, bias = make_logits("ties", t, e, n_group, seed=1)
    outs = route_and_grads(logits, bias, random_cotangent(case), case=case, impl="pallas")
    ids, weights = np.asarray(outs[0]), np.asarray(outs[1])
    assert all(len(set(row)) == top_k for row in ids)  # distinct experts
    assert all(len(set(row // (e // n_group))) <= topk_group for row in ids)
    biased = np.asarray(jax.nn.sigmoid(jnp.asarray(logits))) + bias
    chosen = np.take_along_axis(biased, ids, axis=-1)
    assert np.all(np.diff(chosen, axis=-1) <= 0)  # descending biased score
    if top_k > 1:
        np.testing.assert_allclose(weights.sum(-1), SCALE, rtol=1e-6)


@pytest.mark.parametrize("kind", TIE_KINDS)
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_between_impls_and_plain_autodiff(case, kind):
    t, e, top_k, n_group, _ = case
    logits, bias = make_logits(kind, t, e, n_group)
    r = random_cotangent(case)
    outs = {impl: route_and_grads(logits, bias, r, case=case, impl=impl) for impl in ("xla", "pallas")}
    ids = outs["xla"][0]
    plain = jax.grad(lambda lg: jnp.sum(plain_weights(lg, ids, top_k) * r))(jnp.asarray(logits))
    g_x, g_p = np.asarray(outs["xla"][2]), np.asarray(outs["pallas"][2])
    np.testing.assert_allclose(g_p, g_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_x, np.asarray(plain), rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(g_x) > 0
    assert np.all((g_x != 0).sum(-1) <= top_k)  # only chosen experts get gradient
    for impl in ("xla", "pallas"):
        np.testing.assert_array_equal(np.asarray(outs[impl][3]), 0.0)  # bias: no gradient


def test_bfloat16_logits_and_small_blocks_under_jit():
    case = (100, 64, 6, 4, 2)
    logits, bias = make_logits("random", 100, 64, 4, seed=3)
    logits = jnp.asarray(logits, jnp.bfloat16)
    config = RouterKernelConfig(block_t=16)
    run = jax.jit(lambda lg, b, impl: route(lg, b, case, impl, config), static_argnums=2)
    ids_x, w_x = run(logits, bias, "xla")
    ids_p, w_p = run(logits, bias, "pallas")
    np.testing.assert_array_equal(np.asarray(ids_p), np.asarray(ids_x))
    np.testing.assert_allclose(np.asarray(w_p), np.asarray(w_x), rtol=0, atol=1e-6)
    grad = jax.grad(lambda lg: jnp.sum(route(lg, bias, case, "pallas", config)[1]))(logits)
    assert grad.dtype == jnp.bfloat16 and grad.shape == logits.shape


def test_unsupported_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(pallas_common, "_warned", set())
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    case = (16, 32, 4, 4, 2)
    logits, bias = make_logits("random", 16, 32, 4)
    with pytest.warns(RuntimeWarning, match="falling back"):
        ids, weights = route(logits, bias, case, "pallas")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        route(logits, bias, case, "pallas")
    ids_x, weights_x = route(logits, bias, case, "xla")
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_x))
    np.testing.assert_array_equal(np.asarray(weights), np.asarray(weights_x))


@pytest.mark.parametrize(
    "shape,bias_len,kwargs,match",
    [
        ((4, 30), 30, dict(top_k=2, n_group=4, topk_group=2), "divisible by n_group"),
        ((4, 32), 32, dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
        ((4, 32), 32, dict(top_k=9, n_group=4, topk_group=1), "exceeds the experts kept"),
        ((4, 8), 8, dict(top_k=2, n_group=8, topk_group=2), ">= 2 experts"),
        ((2, 4, 32), 32, dict(top_k=2, n_group=4, topk_group=2), "2-D"),
        ((4, 32), 16, dict(top_k=2, n_group=4, topk_group=2), "expert_bias must have shape"),
        ((4, 32), 32, dict(top_k=0, n_group=4, topk_group=2), "top_k must be a positive"),
        ((4, 32), 32, dict(top_k=2, n_group=4, topk_group=2, impl="cuda"), "impl must be"),
    ],
)
def test_rejects_bad_arguments(shape, bias_len, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_topk_route(jnp.zeros(shape), jnp.zeros(bias_len), routed_scaling_factor=1.0, **kwargs)


def test_rejects_bad_block_config():
    with pytest.raises(ValueError, match="block_t"):
        RouterKernelConfig(block_t=12)


def test_router_sources_follow_the_axis_glossary():
    """ling_jax/layers/__init__.py: K = kv heads, N = flattened tokens, k = experts per token; the
    router's [tokens, top_k] arrays are `_Tk`, and RoPE's per-head input is `x_BTHDh`, not `_BTND`."""
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "pallas_kernels" / "topk_router").glob("*.py")):
        names = set(re.findall(r"\b\w+_TK\b", path.read_text()))
        assert not names, f"{path.name}: {sorted(names)} use K (kv heads) for top-k; the glossary letter is k"
    rope = (root / "ling_jax" / "ops" / "rope.py").read_text()
    assert not re.findall(r"\b\w+_BTND\b", rope), "rope.py uses N (flattened tokens) for heads"
