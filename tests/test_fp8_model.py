"""The model's FP8 output head and its Pallas router (tests/conftest.py tiny config).

- fp8 on: logits and MTP logits are the blockwise FP8 matmul of the final hidden states with
  lm_head (exactly), close to the high-precision head, and the head's statistics are sown.
- router_impl="pallas" (the router kernel, interpreted on CPU) selects exactly the experts the XLA
  router selects in every MoE layer (MTP included) and gives the same gradients, router weights
  included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables, tiny_config

from ling_jax.loss import causal_lm_targets, lm_loss
from ling_jax.model import LingModel
from ling_jax.ops.fp8 import FP8_STATS
from pallas_kernels.fp8_matmul import blockwise_fp8_matmul

B, T = 2, 16


def _ids(cfg, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)), jnp.int32)


def _variables(cfg):
    """params and expert_bias only (random_variables also fills the sown statistics' collection)."""
    variables = random_variables(cfg)
    return {name: jax.tree.map(jnp.asarray, variables[name]) for name in ("params", "expert_bias")}


def test_fp8_head_is_the_blockwise_fp8_matmul():
    cfg = tiny_config(fp8="xla")
    variables = _variables(cfg)
    ids = _ids(cfg)
    out, sown = jax.jit(lambda v, x: LingModel(cfg).apply(v, x, mutable=[FP8_STATS]))(variables, ids)
    head_DV = jnp.asarray(variables["params"]["lm_head"])
    expected = blockwise_fp8_matmul(out.final_hidden.reshape(B * T, -1), head_DV, impl="xla", out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(out.logits).reshape(B * T, -1), np.asarray(expected))
    expected_mtp = blockwise_fp8_matmul(
        out.mtp_hidden[0].reshape(B * T, -1), head_DV, impl="xla", out_dtype=jnp.float32
    )
    np.testing.assert_array_equal(np.asarray(out.mtp_logits[0]).reshape(B * T, -1), np.asarray(expected_mtp))
    exact = out.final_hidden @ head_DV
    err = np.linalg.norm(out.logits - exact) / np.linalg.norm(exact)
    assert 1e-3 < err < 5e-2  # one FP8 GEMM (tests/test_fp8_matmul.py's bound)
    stats = sown[FP8_STATS]
    assert len(stats["lm_head_input_cosine"]) == 1  # sown once (not again for the MTP head)
    for name in ("input_underflow", "input_cosine", "kernel_underflow", "kernel_cosine"):
        assert f"lm_head_{name}" in stats, sorted(stats)
    assert float(stats["lm_head_input_cosine"][0]) > 0.99 and float(stats["lm_head_kernel_cosine"][0]) > 0.99


def test_fp8_off_head_is_unchanged():
    cfg = tiny_config()
    variables = _variables(cfg)
    out = jax.jit(lambda v, x: LingModel(cfg).apply(v, x))(variables, _ids(cfg))
    expected = jnp.einsum(
        "BTD,DV->BTV", out.final_hidden, jnp.asarray(variables["params"]["lm_head"]), preferred_element_type=jnp.float32
    )
    np.testing.assert_allclose(out.logits, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture
def pallas_router():
    """The tiny model with router_impl="pallas" (moe.py passes it to `routing.route`)."""
    return tiny_config(router_impl="pallas")


def _loss_and_grads(cfg, variables, ids):
    targets, mask = causal_lm_targets(ids)

    def loss(params):
        out = LingModel(cfg).apply({"params": params, "expert_bias": variables["expert_bias"]}, ids)
        return lm_loss(out, targets, mask, mtp_weight=cfg.mtp_loss_weight)[0], (out.router, out.mtp_router)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_pallas_router_equals_xla_router_in_the_model(pallas_router):
    xla_cfg = tiny_config()
    variables = _variables(xla_cfg)
    ids = _ids(xla_cfg, seed=1)
    (loss_x, (router_x, mtp_x)), grads_x = _loss_and_grads(xla_cfg, variables, ids)
    (loss_p, (router_p, mtp_p)), grads_p = _loss_and_grads(pallas_router, variables, ids)
    for a, b in ((router_x, router_p), (mtp_x, mtp_p)):
        np.testing.assert_array_equal(np.asarray(a.ids_BTk), np.asarray(b.ids_BTk))
        np.testing.assert_allclose(a.weights_BTk, b.weights_BTk, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss_p, loss_x, rtol=1e-6)
    routers = [(path, g) for path, g in jax.tree_util.tree_leaves_with_path(grads_x) if "router" in str(path)]
    assert len(routers) == 2  # the MoE stack's router (stacked over layers) and the MTP layer's
    for (path, gx), gp in zip(jax.tree_util.tree_leaves_with_path(grads_x), jax.tree.leaves(grads_p)):
        scale = float(jnp.max(jnp.abs(gx))) or 1.0
        np.testing.assert_allclose(gp, gx, rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))
