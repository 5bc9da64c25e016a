"""Properties of LingModel that must hold for any weights: causality, scan == unrolled, remat ==
no remat, jit == no jit, KV-cache decoding == full forward, packed == separate documents, left-padded
batched generation == each prompt alone, routing counts, the MTP input shift, ragged == dense
dispatch, and range-checked token ids under checkify.

Tiny random models (tests/conftest.py): `tiny` (MTP, partial RoPE, QK-norm, GQA, shared expert)
and `variant` (qkv / output biases, tied embeddings, YaRN, full rotary, MHA, 2 MTP layers, no
shared expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from ling_jax.decoding.generate import generate, init_cache
from ling_jax.loss import causal_lm_targets, lm_loss
from ling_jax.model import LingModel

B, T = 2, 8
TIGHT = dict(atol=2e-5, rtol=2e-5)  # same math, different op order / fusion


def _ids(vocab, shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _apply(cfg):
    def fwd(variables, ids, positions=None, segments=None):
        return LingModel(cfg).apply(variables, ids, positions, segments)

    return fwd


def _loss_fn(cfg, expert_bias, ids):
    targets, mask = causal_lm_targets(ids)

    def loss(params):
        out = LingModel(cfg).apply({"params": params, "expert_bias": expert_bias}, ids)
        return lm_loss(out, targets, mask, mtp_weight=cfg.mtp_loss_weight)[0], out.logits

    return jax.value_and_grad(loss, has_aux=True)


_COMPILED: dict = {}


def _forward(cfg, variables, ids, positions=None, segments=None, *, fast_jit, with_mtp=True):
    """Compiled forward, shared by every test that uses the same config and shapes."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    if segments is None:
        segments = jnp.ones(ids.shape, jnp.int32)
    key = ("forward", cfg, ids.shape, with_mtp)
    if key not in _COMPILED:
        fwd = lambda v, x, p, s: LingModel(cfg).apply(v, x, p, s, with_mtp=with_mtp)  # noqa: E731
        _COMPILED[key] = fast_jit(fwd, variables, ids, positions, segments)
    return _COMPILED[key](variables, ids, positions, segments)


def _assert_trees_close(a, b, **tol):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol, err_msg=jax.tree_util.keystr(path))


def _small_config(make_config, **changes):
    """1 dense + 1 MoE layer, no MTP: for the checks that compile once per variant (remat, eager)."""
    return make_config("tiny", num_layers=2, num_mtp_layers=0, **changes)


# --------------------------------------------------------------------------- causality
def test_causality_exact_zero_gradients(tiny_cfg, tiny_vars, fast_jit):
    """d logits[b, t] / d (embedding row of the token at position s) is exactly 0 for s > t, and
    MTP layer 0's logits at t depend on tokens up to t + 1 (its input is shifted by one; the
    vacated last slot reads token id 0, as the reference)."""
    cfg = tiny_cfg
    assert not cfg.tie_word_embeddings  # so the embedding table is only read at the input
    rng = np.random.default_rng(1)
    # Distinct tokens in each row (an embedding row then belongs to exactly one position), never 0.
    ids = jnp.asarray(np.stack([rng.permutation(np.arange(1, cfg.vocab_size))[:T] for _ in range(B)]), jnp.int32)
    u = jnp.asarray(rng.standard_normal((B, T, cfg.vocab_size)), jnp.float32)

    def probes(embedding):
        params = dict(tiny_vars["params"], embedding=embedding)
        out = LingModel(cfg).apply({"params": params, "expert_bias": tiny_vars["expert_bias"]}, ids)
        return (out.logits * u).sum(-1), (out.mtp_logits[0] * u).sum(-1)  # [B, T] each

    jac, jac_mtp = fast_jit(jax.jacrev(probes), tiny_vars["params"]["embedding"])(tiny_vars["params"]["embedding"])
    jac, jac_mtp = np.asarray(jac), np.asarray(jac_mtp)  # [B, T, V, D]
    ids = np.asarray(ids)
    for b in range(B):
        for t in range(T):
            for s in range(T):
                main_row, mtp_row = jac[b, t, ids[b, s]], jac_mtp[b, t, ids[b, s]]
                if s > t:
                    assert np.all(main_row == 0.0), f"logits[{b},{t}] depend on future token at {s}"
                else:
                    assert np.abs(main_row).max() > 0, f"logits[{b},{t}] ignore token at {s}"
                if s > t + 1:
                    assert np.all(mtp_row == 0.0), f"mtp_logits[{b},{t}] depend on token at {s}"
                else:
                    assert np.abs(mtp_row).max() > 0, f"mtp_logits[{b},{t}] ignore token at {s}"
            unused = np.setdiff1d(np.arange(cfg.vocab_size), ids[b])
            assert np.all(jac[b, t, unused] == 0.0)
        # The MTP layer's last position embeds id 0 (shifted-in slot); no other position does.
        assert np.abs(jac_mtp[b, T - 1, 0]).max() > 0
        assert np.all(jac_mtp[b, : T - 1, 0] == 0.0)


def test_mtp_input_shift_variant(variant_cfg, variant_vars, fast_jit):
    """With tied embeddings and 2 MTP layers: changing the token at s leaves main logits at t < s
    and MTP layer i's logits at t < s - i - 1 bit-identical, and changes them at t = s - i - 1."""
    cfg = variant_cfg
    assert cfg.num_mtp_layers == 2 and cfg.tie_word_embeddings
    ids = _ids(cfg.vocab_size, (B, T), seed=2)
    s = 5
    changed = ids.at[:, s].set((ids[:, s] + 7) % cfg.vocab_size)
    a = _forward(cfg, variant_vars, ids, fast_jit=fast_jit)
    b = _forward(cfg, variant_vars, changed, fast_jit=fast_jit)
    np.testing.assert_array_equal(a.logits[:, :s], b.logits[:, :s])
    assert np.abs(a.logits[:, s] - b.logits[:, s]).max() > 1e-3
    for i in range(cfg.num_mtp_layers):
        first = s - i - 1  # the first position whose MTP-i input contains token s
        np.testing.assert_array_equal(a.mtp_logits[i, :, :first], b.mtp_logits[i, :, :first], err_msg=f"mtp {i}")
        assert np.abs(a.mtp_logits[i, :, first] - b.mtp_logits[i, :, first]).max() > 1e-3, f"mtp {i}"


# --------------------------------------------------------------------------- layouts and transforms
def _stack_unrolled(cfg, unrolled):
    """Unrolled variables (dense_stack/layers_0, ...) -> the scanned layout (dense_stack/layers)."""
    out = {}
    for collection, tree in unrolled.items():
        tree = dict(tree)
        for stack, n in (("dense_stack", cfg.num_dense_layers), ("moe_stack", cfg.num_moe_layers)):
            if stack in tree:
                layers = [tree[stack][f"layers_{i}"] for i in range(n)]
                assert set(tree[stack]) == {f"layers_{i}" for i in range(n)}
                tree[stack] = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
        out[collection] = tree
    return out


def test_scan_equals_unrolled(tiny_cfg, make_variables, fast_jit):
    cfg_u = tiny_cfg.replace(scan_layers=False)
    v_u = make_variables(cfg_u, seed=3)
    v_s = _stack_unrolled(tiny_cfg, v_u)
    assert jax.tree.structure(v_s) == jax.tree.structure(make_variables(tiny_cfg))
    ids = _ids(tiny_cfg.vocab_size, (B, T), seed=4)
    scanned = _forward(tiny_cfg, v_s, ids, fast_jit=fast_jit)
    unrolled = _forward(cfg_u, v_u, ids, fast_jit=fast_jit)
    _assert_trees_close(scanned, unrolled, atol=1e-6, rtol=1e-6)


def _grads(cfg, variables, ids, fast_jit):
    key = ("grads", cfg, ids.shape)
    args = (variables["params"],)
    if key not in _COMPILED:
        _COMPILED[key] = fast_jit(_loss_fn(cfg, variables["expert_bias"], ids), *args)
    return _COMPILED[key](*args)


REMAT_CASES = [
    pytest.param("full", True, id="full"),
    pytest.param("save_dots", True, id="save_dots", marks=pytest.mark.slow),
    pytest.param("save_attn_out", True, id="save_attn_out", marks=pytest.mark.slow),
    pytest.param("save_moe_out", True, id="save_moe_out", marks=pytest.mark.slow),
    pytest.param("full", False, id="full-unrolled", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("policy,scan", REMAT_CASES)
def test_remat_equals_no_remat(policy, scan, make_config, make_variables, fast_jit):
    """Loss, logits and every gradient are the same with and without rematerialisation."""
    cfg = _small_config(make_config, scan_layers=scan)
    variables = make_variables(cfg, seed=5)
    ids = _ids(cfg.vocab_size, (B, T), seed=5)
    (loss0, logits0), grads0 = _grads(cfg, variables, ids, fast_jit)
    (loss, logits), grads = _grads(cfg.replace(remat_policy=policy), variables, ids, fast_jit)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    np.testing.assert_allclose(logits, logits0, atol=1e-6, rtol=1e-6)
    _assert_trees_close(grads, grads0, atol=1e-6, rtol=1e-5)


def test_jit_equals_no_jit(make_config, make_variables, fast_jit):
    cfg = _small_config(make_config)
    variables = make_variables(cfg, seed=6)
    ids = _ids(cfg.vocab_size, (1, 4), seed=6)
    jitted = _forward(cfg, variables, ids, fast_jit=fast_jit)
    eager = LingModel(cfg).apply(variables, ids)
    _assert_trees_close(eager, jitted, **TIGHT)


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("kind", ["tiny", pytest.param("variant", marks=pytest.mark.slow)])
def test_kv_cache_decoding_equals_full_forward(kind, make_config, make_variables, fast_jit):
    """Prefill a prefix into a fixed-size cache, then one token per call: the logits equal the
    full forward's at every position."""
    cfg = make_config(kind)
    variables = make_variables(cfg, seed=0 if kind == "tiny" else 1)
    ids = _ids(cfg.vocab_size, (B, T), seed=7)
    full = _forward(cfg, variables, ids, fast_jit=fast_jit)
    prefix = 3

    def step(v, x, cache):
        out = LingModel(cfg).apply(v, x, cache=cache, with_mtp=False)
        return out.logits, out.cache

    cache = init_cache(cfg, B, T)
    logits, cache = fast_jit(step, variables, ids[:, :prefix], cache)(variables, ids[:, :prefix], cache)
    got = [logits]
    one = fast_jit(step, variables, ids[:, :1], cache)
    for t in range(prefix, T):
        logits, cache = one(variables, ids[:, t : t + 1], cache)
        got.append(logits)
    assert int(cache.index) == T
    np.testing.assert_allclose(np.concatenate(got, axis=1), full.logits, **TIGHT)


def test_batched_left_padded_generation_equals_each_alone(gen_cfg, gen_vars):
    """The shorter prompt is left-padded in the batch; alone it is not padded at all. (The longer,
    unpadded row is checked against a no-cache greedy loop in tests/test_generate.py.)"""
    prompts = [[5, 17, 3, 40, 22], [9, 31, 2]]  # as tests/test_generate.py: the batch compile is shared
    batch = generate(gen_cfg, gen_vars, prompts, max_new_tokens=6, return_logits=True)
    alone = generate(gen_cfg, gen_vars, prompts[1:], max_new_tokens=6, return_logits=True)
    np.testing.assert_array_equal(batch.tokens[1], alone.tokens[0])
    np.testing.assert_array_equal(batch.lengths, [6, 6])
    np.testing.assert_allclose(batch.logits[1], alone.logits[0], **TIGHT)


# --------------------------------------------------------------------------- packing and padding
def test_packed_sequences_equal_separate(tiny_cfg, tiny_vars, fast_jit):
    """Row 0 packs documents A and B (segment ids 1, 2; positions restart at 0); row 1 holds one
    document alone, followed by padding (segment 0), which causality makes invisible to it."""
    la, lb = 5, T - 5
    doc_a, doc_b = _ids(tiny_cfg.vocab_size, (la,), seed=8), _ids(tiny_cfg.vocab_size, (lb,), seed=9)
    packed_ids = jnp.concatenate([doc_a, doc_b])
    packed_pos = jnp.asarray(list(range(la)) + list(range(lb)), jnp.int32)
    packed_seg = jnp.asarray([1] * la + [2] * lb, jnp.int32)
    for doc, sl in ((doc_a, slice(0, la)), (doc_b, slice(la, T))):
        n = len(doc)
        alone_ids = jnp.zeros((T,), jnp.int32).at[:n].set(doc)
        alone_seg = jnp.zeros((T,), jnp.int32).at[:n].set(1)
        alone_pos = jnp.arange(T, dtype=jnp.int32)
        out = _forward(
            tiny_cfg,
            tiny_vars,
            jnp.stack([packed_ids, alone_ids]),
            jnp.stack([packed_pos, alone_pos]),
            jnp.stack([packed_seg, alone_seg]),
            fast_jit=fast_jit,
        )
        np.testing.assert_allclose(out.logits[0, sl], out.logits[1, :n], **TIGHT)
        np.testing.assert_array_equal(out.router.ids_BTk[:, 0, sl], out.router.ids_BTk[:, 1, :n])
        # MTP at a document's last token reads the next token of the row (the next document's
        # first token when packed, a padding id alone; the loss masks both), so compare before it.
        np.testing.assert_allclose(out.mtp_logits[:, 0, sl][:, : n - 1], out.mtp_logits[:, 1, : n - 1], **TIGHT)


def test_router_counts_ignore_padding(tiny_cfg, tiny_vars, fast_jit):
    ids = _ids(tiny_cfg.vocab_size, (B, T), seed=10)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.asarray([[1] * T, [0] * 3 + [1] * (T - 3)], jnp.int32)  # row 1 left-padded
    out = _forward(tiny_cfg, tiny_vars, ids, pos, seg, fast_jit=fast_jit)
    k, E = tiny_cfg.num_experts_per_tok, tiny_cfg.num_experts
    real = np.asarray(seg) != 0
    for stats, n_layers in ((out.router, tiny_cfg.num_moe_layers), (out.mtp_router, tiny_cfg.num_mtp_layers)):
        counts = np.asarray(stats.counts_E)
        assert counts.shape == (n_layers, E)
        np.testing.assert_array_equal(counts.sum(-1), real.sum() * k)
        ids_LBTk = np.asarray(stats.ids_BTk)
        for layer in range(n_layers):
            manual = np.bincount(ids_LBTk[layer][real].reshape(-1), minlength=E)
            np.testing.assert_array_equal(counts[layer], manual)
    # Without padding every token counts.
    full = _forward(tiny_cfg, tiny_vars, ids, fast_jit=fast_jit)
    np.testing.assert_array_equal(np.asarray(full.router.counts_E).sum(-1), B * T * k)


# --------------------------------------------------------------------------- MoE dispatch
def test_ragged_dispatch_equals_dense(tiny_cfg, tiny_vars, fast_jit):
    ids = _ids(tiny_cfg.vocab_size, (B, T), seed=12)
    dense = _forward(tiny_cfg, tiny_vars, ids, fast_jit=fast_jit)
    ragged = _forward(tiny_cfg.replace(moe_dispatch="ragged"), tiny_vars, ids, fast_jit=fast_jit)
    _assert_trees_close(ragged, dense, **TIGHT)


@pytest.mark.slow
def test_ragged_dispatch_gradients_equal_dense(make_config, make_variables, fast_jit):
    cfg = _small_config(make_config)
    variables = make_variables(cfg, seed=5)
    ids = _ids(cfg.vocab_size, (B, T), seed=5)
    (loss_d, _), grads_d = _grads(cfg, variables, ids, fast_jit)
    (loss_r, _), grads_r = _grads(cfg.replace(moe_dispatch="ragged"), variables, ids, fast_jit)
    np.testing.assert_allclose(loss_r, loss_d, rtol=1e-6)
    _assert_trees_close(grads_r, grads_d, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- token id checks
def test_checked_model_rejects_out_of_range_ids_inside_jit(tiny_cfg, tiny_vars, fast_jit):
    model = LingModel(tiny_cfg, checked=True)
    good = _ids(tiny_cfg.vocab_size, (B, T), seed=11)
    checked = fast_jit(
        checkify.checkify(lambda v, x: model.apply(v, x).logits, errors=checkify.user_checks), tiny_vars, good
    )
    err, logits = checked(tiny_vars, good)
    assert err.get() is None
    err.throw()  # valid ids: no error
    plain = _forward(tiny_cfg, tiny_vars, good, fast_jit=fast_jit)
    np.testing.assert_array_equal(logits, plain.logits)  # the check does not change the result
    for bad_id in (tiny_cfg.vocab_size, -1, 10**6):
        err, _ = checked(tiny_vars, good.at[1, 2].set(bad_id))  # same shapes: no recompilation
        assert err.get() is not None
        with pytest.raises(checkify.JaxRuntimeError, match=rf"input_ids out of range \[0, {tiny_cfg.vocab_size}\)"):
            err.throw()
        assert str(bad_id) in err.get()


def test_apply_checked_rejects_bad_ids_on_the_host(tiny_cfg, tiny_vars):
    from ling_jax.model import apply_checked

    V = tiny_cfg.vocab_size
    for bad, match in [
        (np.full((1, 4), V, np.int32), rf"input_ids: token id {V} at position \(0, 0\).*\[0, {V}\)"),
        (np.array([[1, -1, 2]], np.int32), r"input_ids: token id -1 at position \(0, 1\)"),
        (np.array([[1.0, 2.7]]), r"input_ids: token ids must be integers"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_checked(tiny_cfg, tiny_vars, bad)
    with pytest.raises(TypeError, match=r"inside jit use LingModel\(config, checked=True\)"):
        jax.eval_shape(lambda ids: apply_checked(tiny_cfg, tiny_vars, ids).logits, jnp.zeros((1, 4), jnp.int32))


def test_apply_checked_equals_apply_on_valid_ids(tiny_cfg, tiny_vars):
    from ling_jax.model import apply_checked

    ids = _ids(tiny_cfg.vocab_size, (1, 4), seed=3)
    checked = apply_checked(tiny_cfg, tiny_vars, ids, with_mtp=False)
    plain = LingModel(tiny_cfg).apply(tiny_vars, ids, with_mtp=False)
    np.testing.assert_array_equal(checked.logits, plain.logits)


def test_more_tokens_than_positions_is_refused_at_trace_time(tiny_cfg, tiny_vars):
    """Shapes are static, so the check costs nothing: eval_shape (no compile) already raises."""
    model = LingModel(tiny_cfg)
    limit = tiny_cfg.max_position_embeddings
    fits = jax.eval_shape(lambda ids: model.apply(tiny_vars, ids).logits, jnp.zeros((1, limit), jnp.int32))
    assert fits.shape == (1, limit, tiny_cfg.vocab_size)
    with pytest.raises(ValueError, match=rf"input of {limit + 1} tokens exceeds max_position_embeddings={limit}"):
        jax.eval_shape(lambda ids: model.apply(tiny_vars, ids).logits, jnp.zeros((1, limit + 1), jnp.int32))
    cache = init_cache(tiny_cfg, 1, limit + 1)
    with pytest.raises(ValueError, match=rf"a decode cache of {limit + 1} slots exceeds"):
        jax.eval_shape(lambda ids: model.apply(tiny_vars, ids, cache=cache).logits, jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(TypeError, match=r"input_ids must be integer token ids, got dtype float32"):
        jax.eval_shape(lambda ids: model.apply(tiny_vars, ids).logits, jnp.zeros((1, 4), jnp.float32))
