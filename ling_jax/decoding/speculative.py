"""MTP self-speculative decoding: MTP layer 0 drafts k tokens, the main model verifies them in one
forward over k + 1 positions, the accepted prefix plus one token from the main model is kept.

Slots. Prompts are left-padded to T; the token at slot s has rope position s - (padding of its row).
Per row, `L` is the slot of the last committed token (not yet in the main cache): the main cache
holds slots < L. MTP layer 0 at slot s reads embed(token at s + 1) and the main model's final hidden
at s, and predicts the token at s + 2 (as in training), so its cache entry for s can be written once
token s + 1 is known. Each iteration:

1. Draft step 1: MTP layer 0 over the "pending" slots L - c .. L - 1 (c = 1 .. k + 1 entries, held
   in a fixed [B, k + 1] buffer; unused entries carry segment id 0). Their hidden states are the
   main model's, so these cache entries are exact; the last output drafts d_1 (the token at L + 1).
2. Draft steps 2 .. k: the MTP layer again, one slot at a time, on embed(d_{j-1}) and its own
   previous output (a single MTP layer applied recurrently; further MTP layers are not used).
3. Verify: the main model over [x_L, d_1 .. d_k] at slots L .. L + k, one forward with the cache.
4. Accept: greedy keeps d_i while it equals the main model's argmax, then the argmax at the first
   mismatch (or after d_k): exactly the plain greedy tokens. With temperature > 0, d_i is kept with
   probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from the
   normalised max(0, p - q), after k acceptances from p_{k+1} (p: the main model's, q: the draft's
   distribution, both after the same temperature / top-k / top-p filter), so the output is
   distributed exactly as plain sampling's.
5. Roll back: nothing is erased. Each row's write position moves to L + a + 1 (a accepted); the
   stale slots beyond it lie after every query of the next steps (causality by slot) and are
   overwritten by the next verify (k + 1 slots from L + a + 1) and the next pending draft call
   (k + 1 slots from L), so both caches only ever show committed tokens.

Every row has its own cache write position (DecodeCache.index [B]): rows accept different numbers
of tokens and stop at different times; a stopped row's state is frozen. One jitted while_loop.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ling_jax.decoding.generate import init_cache, is_stop
from ling_jax.decoding.sampling import filter_logits, token_logprobs
from ling_jax.model import DecodeCache, LingModel


class _SpecState(NamedTuple):
    """The speculative loop's carry (K1 = draft_tokens + 1, N = max_new_tokens)."""

    main: DecodeCache  # index [B] = L, the slot of the last committed token
    draft: DecodeCache  # MTP layer 0's cache (mtp field), its own segment ids; index unused
    last_B: jax.Array  # the last committed token (at slot L)
    pos_B: jax.Array  # its rope position
    pend_ids_BK: jax.Array  # [B, K1] token at s + 1 for pending MTP slots s = L - count ..
    pend_h_BKD: jax.Array  # [B, K1, D] the main model's final hidden at those slots
    count_B: jax.Array  # valid pending entries (1 .. K1)
    n_B: jax.Array  # tokens committed (the first generated token included)
    done_B: jax.Array
    rng: jax.Array
    tokens_BN: jax.Array
    logprobs_BN: jax.Array
    logits_BNV: jax.Array | None
    steps_B: jax.Array  # verify forwards while active
    accepted_B: jax.Array  # draft tokens accepted


def _draft_dist(logits_BV, temperature, top_k, top_p):
    if temperature == 0.0:
        return logits_BV
    return filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)


def _pick(filtered_BV, key, temperature):
    if temperature == 0.0:
        return jnp.argmax(filtered_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "return_logits",
        "draft_tokens",
        "stream",
    ),
)
def speculative_generate(
    variables,
    ids_BT,
    positions_BT,
    segments_BT,
    stop_ids,
    pad_id,
    rng,
    *,
    cfg,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    return_logits,
    draft_tokens,
    stream=None,
):
    """The speculative decode program (see the module docstring); `generate` validates and calls it."""
    model = LingModel(cfg)
    k, N = draft_tokens, max_new_tokens
    K1 = k + 1
    B, T = ids_BT.shape
    V, D = cfg.vocab_size, cfg.hidden_size
    rows_B1 = jnp.arange(B)[:, None]
    arange_K = jnp.arange(K1, dtype=jnp.int32)

    # Prefill: the main stack over the prompt, the first token from its last logits.
    empty = init_cache(cfg, B, T + N, mtp=True)
    out = model.apply(variables, ids_BT, positions_BT, segments_BT, cache=empty._replace(mtp=None), with_mtp=False)
    rng, key = jax.random.split(rng)
    first_BV = out.logits[:, -1]
    x_B = _pick(_draft_dist(first_BV, temperature, top_k, top_p), key, temperature)
    # MTP prefill over slots 0 .. T - 2 (slot T - 1 becomes the first pending entry).
    shifted_BT = jnp.concatenate([ids_BT[:, 1:], x_B[:, None]], axis=1)
    draft_segments_BT = segments_BT.at[:, -1].set(0)
    draft_in = DecodeCache(None, None, empty.segment_ids_BS, jnp.int32(0), empty.mtp)
    draft = model.apply(
        variables, shifted_BT, positions_BT, draft_segments_BT, cache=draft_in, mtp_hidden_BTD=out.final_hidden
    ).cache._replace(index=jnp.zeros((B,), jnp.int32))  # per-row from here on (set before each call)

    if stream is not None:
        jax.debug.callback(stream, x_B[:, None], jnp.ones((B,), jnp.int32), ordered=True)
    done_B = is_stop(x_B, stop_ids) | (N == 1)
    tokens_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(x_B)
    logprobs_BN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(token_logprobs(first_BV, x_B))
    logits_BNV = jnp.zeros((B, N, V), jnp.float32).at[:, 0].set(first_BV) if return_logits else None
    pend_ids_BK = jnp.full((B, K1), pad_id, jnp.int32).at[:, 0].set(x_B)
    pend_h_BKD = jnp.zeros((B, K1, D), out.final_hidden.dtype).at[:, 0].set(out.final_hidden[:, -1])
    state = _SpecState(
        main=out.cache._replace(index=jnp.full((B,), T, jnp.int32)),
        draft=draft,
        last_B=x_B,
        pos_B=positions_BT[:, -1] + 1,
        pend_ids_BK=pend_ids_BK,
        pend_h_BKD=pend_h_BKD,
        count_B=jnp.ones((B,), jnp.int32),
        n_B=jnp.ones((B,), jnp.int32),
        done_B=done_B,
        rng=rng,
        tokens_BN=tokens_BN,
        logprobs_BN=logprobs_BN,
        logits_BNV=logits_BNV,
        steps_B=jnp.zeros((B,), jnp.int32),
        accepted_B=jnp.zeros((B,), jnp.int32),
    )

    def body(s: _SpecState) -> _SpecState:
        rng, *keys = jax.random.split(s.rng, k + 3)
        L_B = s.main.index
        # 1. Draft step 1: the pending slots L - count .. L - 1 (entries past count: segment 0).
        start_B = L_B - s.count_B
        out = model.apply(
            variables,
            s.pend_ids_BK,
            s.pos_B[:, None] - s.count_B[:, None] + arange_K,
            (arange_K[None, :] < s.count_B[:, None]).astype(jnp.int32),
            cache=s.draft._replace(index=start_B),
            mtp_hidden_BTD=s.pend_h_BKD,
        )
        draft = out.cache
        last_K = (s.count_B - 1)[:, None, None]
        g_BD = jnp.take_along_axis(out.final_hidden, last_K, axis=1)[:, 0]
        q_BV = _draft_dist(jnp.take_along_axis(out.logits, last_K, axis=1)[:, 0], temperature, top_k, top_p)
        drafts, q_dists = [_pick(q_BV, keys[0], temperature)], [q_BV]
        # 2. Draft steps 2 .. k: slot L + j - 2, the MTP layer on its own previous output.
        for j in range(2, k + 1):
            out = model.apply(
                variables,
                drafts[-1][:, None],
                (s.pos_B + j - 2)[:, None],
                jnp.ones((B, 1), jnp.int32),
                cache=draft._replace(index=L_B + j - 2),
                mtp_hidden_BTD=g_BD[:, None],
            )
            draft, g_BD = out.cache, out.final_hidden[:, 0]
            q_dists.append(_draft_dist(out.logits[:, 0], temperature, top_k, top_p))
            drafts.append(_pick(q_dists[-1], keys[j - 1], temperature))
        d_Bk = jnp.stack(drafts, axis=1)

        # 3. Verify [x_L, d_1 .. d_k] at slots L .. L + k.
        out = model.apply(
            variables,
            jnp.concatenate([s.last_B[:, None], d_Bk], axis=1),
            s.pos_B[:, None] + arange_K,
            jnp.ones((B, K1), jnp.int32),
            cache=s.main,
            with_mtp=False,
        )
        logits_BKV = out.logits

        # 4. Accept a prefix of the drafts, then one token from the main model.
        if temperature == 0.0:
            target_BK = jnp.argmax(logits_BKV, axis=-1).astype(jnp.int32)
            accept_Bk = d_Bk == target_BK[:, :k]
            a_B = jnp.sum(jnp.cumprod(accept_Bk, axis=1), axis=1).astype(jnp.int32)
            chunk_BK = target_BK  # target_i == d_i for i < a
        else:
            p_BKV = jax.nn.softmax(_draft_dist(logits_BKV, temperature, top_k, top_p), axis=-1)
            q_BkV = jax.nn.softmax(jnp.stack(q_dists, axis=1), axis=-1)
            p_d = jnp.take_along_axis(p_BKV[:, :k], d_Bk[..., None], axis=-1)[..., 0]
            q_d = jnp.take_along_axis(q_BkV, d_Bk[..., None], axis=-1)[..., 0]
            u_Bk = jax.random.uniform(keys[k], (B, k))
            accept_Bk = u_Bk * q_d < p_d  # u < p / q, without dividing (q(d) > 0: d was drawn from q)
            a_B = jnp.sum(jnp.cumprod(accept_Bk, axis=1), axis=1).astype(jnp.int32)
            q_BKV = jnp.concatenate([q_BkV, jnp.zeros((B, 1, V), q_BkV.dtype)], axis=1)  # after d_k: draw from p
            p_aV = jnp.take_along_axis(p_BKV, a_B[:, None, None], axis=1)[:, 0]
            q_aV = jnp.take_along_axis(q_BKV, a_B[:, None, None], axis=1)[:, 0]
            residual_BV = jnp.maximum(p_aV - q_aV, 0.0)
            # Zero mass (p == q up to rounding) can only follow an acceptance-certain draft: fall back to p.
            residual_BV = jnp.where(jnp.sum(residual_BV, -1, keepdims=True) > 0, residual_BV, p_aV)
            c_B = jax.random.categorical(keys[k + 1], jnp.log(residual_BV), axis=-1).astype(jnp.int32)
            chunk_BK = jnp.concatenate([d_Bk, jnp.zeros((B, 1), jnp.int32)], axis=1)
            chunk_BK = jnp.where(arange_K[None, :] == a_B[:, None], c_B[:, None], chunk_BK)

        # Commit up to a + 1 tokens: cut at max_new_tokens and after the first stop token.
        active_B = ~s.done_B
        take_B = jnp.minimum(a_B + 1, N - s.n_B)
        stop_BK = is_stop(chunk_BK, stop_ids) & (arange_K[None, :] < take_B[:, None])
        hit_B = jnp.any(stop_BK, axis=1)
        take_B = jnp.where(hit_B, jnp.argmax(stop_BK, axis=1) + 1, take_B)
        take_B = jnp.where(active_B, take_B, 0)
        slot_BK = jnp.where(arange_K[None, :] < take_B[:, None], s.n_B[:, None] + arange_K, N)  # N: dropped
        tokens_BN = s.tokens_BN.at[rows_B1, slot_BK].set(chunk_BK, mode="drop")
        logprobs_BN = s.logprobs_BN.at[rows_B1, slot_BK].set(token_logprobs(logits_BKV, chunk_BK), mode="drop")
        logits_BNV = s.logits_BNV
        if return_logits:
            logits_BNV = logits_BNV.at[rows_B1, slot_BK].set(logits_BKV, mode="drop")
        if stream is not None:
            jax.debug.callback(stream, chunk_BK, take_B, ordered=True)
        n_B = s.n_B + take_B
        done_B = s.done_B | (active_B & (hit_B | (n_B >= N)))

        # 5. Roll back: the next write positions follow the accepted count; stopped rows stay frozen.
        def keep(new, old):
            mask = active_B.reshape((B,) + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        a1_B = a_B + 1
        return _SpecState(
            main=out.cache._replace(index=keep(L_B + a1_B, L_B)),
            draft=draft,
            last_B=keep(jnp.take_along_axis(chunk_BK, a_B[:, None], axis=1)[:, 0], s.last_B),
            pos_B=keep(s.pos_B + a1_B, s.pos_B),
            pend_ids_BK=keep(chunk_BK, s.pend_ids_BK),
            pend_h_BKD=keep(out.final_hidden, s.pend_h_BKD),
            count_B=keep(a1_B, s.count_B),
            n_B=n_B,
            done_B=done_B,
            rng=rng,
            tokens_BN=tokens_BN,
            logprobs_BN=logprobs_BN,
            logits_BNV=logits_BNV,
            steps_B=s.steps_B + active_B.astype(jnp.int32),
            accepted_B=s.accepted_B + jnp.where(active_B, jnp.minimum(a_B, take_B), 0),
        )

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), body, state)
    return dict(
        tokens=state.tokens_BN,
        lengths=state.n_B,
        logprobs=state.logprobs_BN,
        logits=state.logits_BNV,
        forward_steps=state.steps_B,
        accepted_drafts=state.accepted_B,
    )
