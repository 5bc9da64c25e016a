"""KV-cache decoding: one jitted prefill, then one token per step inside a jitted while loop.

Prompts of different lengths are left-padded; padding slots carry segment id 0 so no real token
attends to them, and each row's positions start at 0 at its first real token. The cache has a
fixed size (longest prompt + max_new_tokens), so nothing recompiles as decoding proceeds.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.data import check_token_ids
from ling_jax.decoding.sampling import sample_logits, validate_sampling
from ling_jax.layers.attention import KVCache
from ling_jax.model import DecodeCache, LingModel


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] generated ids; after a stop token, pad_id
    lengths: np.ndarray  # [B] generated tokens per row, the stop token included
    step_logits: np.ndarray  # [B, max_new_tokens, V] float32 logits each token was drawn from


class _DecodeState(NamedTuple):
    """The decode loop's carry. N indexes generated tokens (max_new_tokens)."""

    step: jax.Array  # int32: tokens generated so far (the slot the next token is written to)
    cache: DecodeCache
    logits_BV: jax.Array  # float32 logits of the next token
    pos_B: jax.Array  # position of the next token in each row
    done_B: jax.Array  # bool: the row has emitted a stop token
    rng: jax.Array
    tokens_BN: jax.Array  # generated ids; pad_id after a stop
    step_logits_BNV: jax.Array  # the logits each token was drawn from
    lengths_B: jax.Array  # generated tokens per row, the stop token included


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> DecodeCache:
    dtype = dtype or cfg.jnp_dtype

    def stack(n):
        if n == 0:
            return None
        shape = (n, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    return DecodeCache(
        dense=stack(cfg.num_dense_layers),
        moe=stack(cfg.num_moe_layers),
        segment_ids_BS=jnp.zeros((batch, slots), jnp.int32),
        index=jnp.int32(0),
    )


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    lengths = np.array([len(p) for p in prompts])
    if lengths.min() == 0:
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty; every prompt needs at least one token")
    T = int(lengths.max())
    ids_BT = np.full((len(prompts), T), pad_id, np.int32)
    segments_BT = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        ids_BT[b, T - len(p) :] = p
        segments_BT[b, T - len(p) :] = 1
    positions_BT = np.maximum(np.arange(T)[None, :] - (T - lengths)[:, None], 0).astype(np.int32)
    return ids_BT, positions_BT, segments_BT, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(
    variables,
    ids_BT,
    positions_BT,
    segments_BT,
    stop_ids,
    pad_id,
    rng,
    cache,
    *,
    cfg,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
):
    model = LingModel(cfg)
    B = ids_BT.shape[0]
    V = cfg.vocab_size
    out = model.apply(variables, ids_BT, positions_BT, segments_BT, cache=cache, with_mtp=False)

    def is_stop(tok_B):
        return jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)

    def body(state: _DecodeState) -> _DecodeState:
        rng, key = jax.random.split(state.rng)
        tok_B = sample_logits(state.logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p)
        tok_B = jnp.where(state.done_B, pad_id, tok_B)
        out = model.apply(
            variables,
            tok_B[:, None],
            state.pos_B[:, None],
            jnp.ones((B, 1), jnp.int32),
            cache=state.cache,
            with_mtp=False,
        )
        return _DecodeState(
            step=state.step + 1,
            cache=out.cache,
            logits_BV=out.logits[:, -1],
            pos_B=state.pos_B + 1,
            done_B=state.done_B | is_stop(tok_B),
            rng=rng,
            tokens_BN=state.tokens_BN.at[:, state.step].set(tok_B),
            step_logits_BNV=state.step_logits_BNV.at[:, state.step].set(state.logits_BV),
            lengths_B=state.lengths_B + (~state.done_B).astype(jnp.int32),
        )

    def cond(state: _DecodeState):
        return (state.step < max_new_tokens) & ~jnp.all(state.done_B)

    state = _DecodeState(
        step=jnp.int32(0),
        cache=out.cache,
        logits_BV=out.logits[:, -1],
        pos_B=positions_BT[:, -1] + 1,
        done_B=jnp.zeros((B,), bool),
        rng=rng,
        tokens_BN=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
        step_logits_BNV=jnp.zeros((B, max_new_tokens, V), jnp.float32),
        lengths_B=jnp.zeros((B,), jnp.int32),
    )
    state = jax.lax.while_loop(cond, body, state)
    return state.tokens_BN, state.lengths_B, state.step_logits_BNV


def generate(
    cfg: ModelConfig,
    variables,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int | None = None,
) -> GenerateOutput:
    """Decodes `max_new_tokens` tokens after each prompt (a batch; lengths may differ).

    Greedy when temperature == 0, else sampling with optional top-k / top-p. A row stops after
    emitting any of `stop_tokens`; its remaining slots hold `pad_id`.
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("seed", seed)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    validate_sampling(temperature, top_k, top_p, cfg.vocab_size)
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    # Checked before any conversion, so a non-integer id (1.7) is an error, never truncated.
    prompt_arrays = [np.asarray(p) for p in prompts]
    for i, p in enumerate(prompt_arrays):
        if p.ndim != 1:
            raise ValueError(f"prompt {i} must be a 1-D sequence of token ids, got shape {p.shape}")
        check_token_ids(p, cfg.vocab_size, what=f"prompt {i}")
    prompts = [p.astype(np.int64).tolist() for p in prompt_arrays]
    stop_array = np.asarray(list(stop_tokens))
    check_token_ids(stop_array if stop_array.size else stop_array.astype(np.int64), cfg.vocab_size, what="stop_tokens")
    stop_tokens = stop_array.astype(np.int64).tolist()
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    check_token_ids(np.asarray([pad_id]), cfg.vocab_size, what="pad_id")
    pad_id = int(pad_id)
    ids_BT, positions_BT, segments_BT, _ = _left_pad(prompts, pad_id)
    total = ids_BT.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {ids_BT.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    cache = init_cache(cfg, len(prompts), total)
    stop_ids = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    tokens, lengths, step_logits = _generate(
        variables,
        ids_BT,
        positions_BT,
        segments_BT,
        stop_ids,
        jnp.int32(pad_id),
        jax.random.key(seed),
        cache,
        cfg=cfg,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),  # validated above: exact conversions
        top_k=int(top_k),
        top_p=float(top_p),
    )
    return GenerateOutput(np.asarray(tokens), np.asarray(lengths), np.asarray(step_logits))
