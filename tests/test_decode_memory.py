"""`generate` stays O(B x N) in memory at Ling's vocabulary (157,184): no [B, N, V] value anywhere in
the traced decode program (every sub-jaxpr included) unless `return_logits=True` asks for it.
Traced only (make_jaxpr on abstract variables): nothing is compiled or allocated."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import abstract_variables, tiny_config

from ling_jax.decoding.generate import _generate
from ling_jax.decoding.speculative import speculative_generate

V = 157_184  # Ling 2.0's vocabulary
B, T, N = 4, 5, 16


def _all_vars(jaxpr):
    """Every variable of a closed jaxpr and its sub-jaxprs (while bodies, scans, pjit calls)."""
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from sub.invars
            yield from _all_vars(sub)


def _largest(fun, cfg, **kwargs):
    variables = abstract_variables(cfg)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    args = (variables, ids, ids, ids, jnp.asarray([cfg.eos_token_id], jnp.int32), jnp.int32(0), jax.random.key(0))
    settings = dict(cfg=cfg, max_new_tokens=N, temperature=1.0, top_k=0, top_p=0.9, **kwargs)
    closed = jax.make_jaxpr(functools.partial(fun.__wrapped__, **settings))(*args)
    sizes = [int(np.prod(v.aval.shape)) for v in _all_vars(closed.jaxpr) if hasattr(v.aval, "shape")]
    return max(sizes)


@pytest.fixture(scope="module")
def big_vocab_cfg():
    return tiny_config(vocab_size=V, eos_token_id=V - 2, pad_token_id=V - 1)


@pytest.mark.parametrize("return_logits", [False, True])
def test_plain_decode_has_no_BNV_array(big_vocab_cfg, return_logits):
    largest = _largest(_generate, big_vocab_cfg, return_logits=return_logits)
    if return_logits:  # the check can fail: asking for the logits does create one
        assert largest >= B * N * V
    else:
        assert largest < B * N * V, largest
        assert largest <= 2 * B * V + V * big_vocab_cfg.hidden_size, largest  # [B, V]-sized values at most


@pytest.mark.parametrize("return_logits", [False, True])
def test_speculative_decode_has_no_BNV_array(big_vocab_cfg, return_logits):
    k = 3
    largest = _largest(speculative_generate, big_vocab_cfg, return_logits=return_logits, draft_tokens=k)
    if return_logits:
        assert largest >= B * N * V
    else:
        assert largest < B * N * V, largest
        assert largest <= 2 * B * (k + 1) * V + V * big_vocab_cfg.hidden_size, largest  # [B, k + 1, V] at most
