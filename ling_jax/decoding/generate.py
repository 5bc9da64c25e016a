"""KV-cache decoding: one jitted prefill, then one token per step inside a jitted while loop, or
(`speculative="mtp"`) MTP self-speculative decoding (ling_jax/decoding/speculative.py).

Prompts of different lengths are left-padded; padding slots carry segment id 0 so no real token
attends to them, and each row's positions start at 0 at its first real token. The cache has a
fixed size (longest prompt + max_new_tokens), so nothing recompiles as decoding proceeds: one
compile per (batch, prompt length, max_new_tokens, settings), and no host round trip per token.

Lean by default: the loop carries tokens and their log-probs ([B, N]) and only the current step's
logits; the [B, N, V] logits are kept only with `return_logits=True`.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ling_jax.config import ModelConfig
from ling_jax.data import check_token_ids
from ling_jax.decoding.sampling import sample_logits, token_logprobs, validate_sampling
from ling_jax.layers.attention import KVCache
from ling_jax.model import DecodeCache, LingModel
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES, batch_spec, mesh_axes

SPECULATIVE_MODES = (None, "mtp")
CACHE_AXES = ("activation_batch", None, None, None)  # one layer's [B, S, K, Dh]


class GenerateOutput(NamedTuple):
    """What `generate` returns (host numpy arrays). Memory is O(B x N) unless `return_logits=True`.

    `logprobs[b, n]` is log softmax(raw float32 logits)[tokens[b, n]]: the log-probability of the
    generated token under the model's own distribution at temperature 1, before any temperature,
    top-k or top-p filter (the policy log-prob an RL objective's importance ratio needs), whatever
    the sampling settings were. It is 0 after a row stops (slots holding pad_id).
    """

    tokens: np.ndarray  # [B, N] int32 generated ids; after a stop token, pad_id
    lengths: np.ndarray  # [B] int32 generated tokens per row, the stop token included
    logprobs: np.ndarray  # [B, N] float32 (see above)
    logits: np.ndarray | None = None  # [B, N, V] float32 logits each token was drawn from; only with return_logits
    forward_steps: np.ndarray | None = (
        None  # [B] main-model decode forwards while the row was active (prefill excluded)
    )
    accepted_drafts: np.ndarray | None = None  # [B] draft tokens accepted (speculative decoding; 0 otherwise)


class _DecodeState(NamedTuple):
    """The plain decode loop's carry. N indexes generated tokens (max_new_tokens)."""

    step: jax.Array  # int32: tokens generated so far (the slot the next token is written to)
    cache: DecodeCache
    logits_BV: jax.Array  # float32 logits of the next token
    pos_B: jax.Array  # position of the next token in each row
    done_B: jax.Array  # bool: the row has emitted a stop token
    rng: jax.Array
    tokens_BN: jax.Array  # generated ids; pad_id after a stop
    logprobs_BN: jax.Array  # float32 log-prob of each generated token (unfiltered, temperature 1)
    logits_BNV: jax.Array | None  # the logits each token was drawn from (return_logits only)
    lengths_B: jax.Array  # generated tokens per row, the stop token included


def _constrain_cache(kv: KVCache, stacked: bool) -> KVCache:
    """Pins a cache's batch axis to the mesh's batch axes (a no-op without a mesh in context)."""
    axes = ((None,) if stacked else ()) + CACHE_AXES
    return jax.tree.map(lambda x: nn.with_logical_constraint(x, axes), kv)


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None, *, mtp: bool = False) -> DecodeCache:
    """An empty fixed-size cache of `slots` slots for the main stacks (and MTP layer 0 with `mtp`)."""
    dtype = dtype or cfg.jnp_dtype
    shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)

    def stack(n):
        if n == 0:
            return None
        return _constrain_cache(KVCache(jnp.zeros((n, *shape), dtype), jnp.zeros((n, *shape), dtype)), True)

    return DecodeCache(
        dense=stack(cfg.num_dense_layers),
        moe=stack(cfg.num_moe_layers),
        segment_ids_BS=jnp.zeros((batch, slots), jnp.int32),
        index=jnp.int32(0),
        mtp=_constrain_cache(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), False) if mtp else None,
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


def is_stop(tok_B, stop_ids):
    """True where a token is one of `stop_ids` (int32 [S]; -1 entries never match)."""
    return jnp.any(tok_B[..., None] == stop_ids, axis=-1)


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "return_logits", "stream")
)
def _generate(
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
    stream=None,
):
    model = LingModel(cfg)
    B, T = ids_BT.shape
    V = cfg.vocab_size
    cache = init_cache(cfg, B, T + max_new_tokens)
    out = model.apply(variables, ids_BT, positions_BT, segments_BT, cache=cache, with_mtp=False)

    def body(state: _DecodeState) -> _DecodeState:
        rng, key = jax.random.split(state.rng)
        tok_B = sample_logits(state.logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p)
        tok_B = jnp.where(state.done_B, pad_id, tok_B)
        logprob_B = jnp.where(state.done_B, 0.0, token_logprobs(state.logits_BV, tok_B))
        out = model.apply(
            variables,
            tok_B[:, None],
            state.pos_B[:, None],
            jnp.ones((B, 1), jnp.int32),
            cache=state.cache,
            with_mtp=False,
        )
        if stream is not None:
            jax.debug.callback(stream, tok_B[:, None], (~state.done_B).astype(jnp.int32), ordered=True)
        logits_BNV = state.logits_BNV
        if return_logits:
            logits_BNV = logits_BNV.at[:, state.step].set(state.logits_BV)
        return _DecodeState(
            step=state.step + 1,
            cache=out.cache,
            logits_BV=out.logits[:, -1],
            pos_B=state.pos_B + 1,
            done_B=state.done_B | is_stop(tok_B, stop_ids),
            rng=rng,
            tokens_BN=state.tokens_BN.at[:, state.step].set(tok_B),
            logprobs_BN=state.logprobs_BN.at[:, state.step].set(logprob_B),
            logits_BNV=logits_BNV,
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
        logprobs_BN=jnp.zeros((B, max_new_tokens), jnp.float32),
        logits_BNV=jnp.zeros((B, max_new_tokens, V), jnp.float32) if return_logits else None,
        lengths_B=jnp.zeros((B,), jnp.int32),
    )
    state = jax.lax.while_loop(cond, body, state)
    return dict(
        tokens=state.tokens_BN,
        lengths=state.lengths_B,
        logprobs=state.logprobs_BN,
        logits=state.logits_BNV,
        forward_steps=state.lengths_B,  # one forward per generated token
        accepted_drafts=jnp.zeros((B,), jnp.int32),
    )


def _check_int(name, value, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")


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
    return_logits: bool = False,
    speculative: str | None = None,
    draft_tokens: int = 2,
    mesh: jax.sharding.Mesh | None = None,
    stream=None,
) -> GenerateOutput:
    """Decodes `max_new_tokens` tokens after each prompt (a batch; lengths may differ).

    Greedy when temperature == 0, else sampling with optional top-k / top-p. A row stops after
    emitting any of `stop_tokens`; its remaining slots hold `pad_id`. Returns tokens, lengths and
    log-probs (see GenerateOutput); the [B, N, V] logits only with `return_logits=True`.

    `speculative="mtp"`: MTP layer 0 drafts `draft_tokens` tokens per step, the main model verifies
    them in one forward (ling_jax/decoding/speculative.py); the output has the plain decoder's
    distribution (greedy: the same tokens).

    `mesh`: the batch is split over the mesh's batch axes (those the sharding rules give
    "activation_batch": data, fsdp, expert), the loop traced under the mesh and the rules table as
    the train step is; B must divide evenly over those axes. Variables are used as passed (already
    sharded ones stay so).

    `stream(tokens_BK, counts_B)`: a host function called from inside the compiled loop (an ordered
    `jax.debug.callback`) with each step's new tokens, in order: row b committed
    tokens_BK[b, :counts_B[b]]. For interactive use (`ling-jax generate`); it costs a host round trip per step.
    """
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("seed", seed, -(2**63))
    validate_sampling(temperature, top_k, top_p, cfg.vocab_size)
    if not isinstance(return_logits, bool):
        raise ValueError(f"return_logits must be True or False, got {return_logits!r}")
    if speculative not in SPECULATIVE_MODES:
        raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {speculative!r}")
    if speculative is not None:
        _check_int("draft_tokens", draft_tokens, 1)
        if cfg.num_mtp_layers < 1:
            raise ValueError(
                f"speculative={speculative!r} drafts with the model's MTP layer, but this model has "
                f"num_mtp_layers={cfg.num_mtp_layers}"
            )
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
    inputs = (ids_BT, positions_BT, segments_BT)
    context = contextlib.nullcontext()
    if mesh is not None:
        split = int(
            np.prod([mesh.shape[a] for a in mesh_axes("activation_batch", mesh.axis_names, LOGICAL_AXIS_RULES)])
        )
        if len(prompts) % split:
            raise ValueError(
                f"mesh: {len(prompts)} prompts do not split evenly over the mesh's batch axes "
                f"({split} devices); pass a multiple of {split}"
            )
        sharding = NamedSharding(mesh, batch_spec(LOGICAL_AXIS_RULES))
        inputs = tuple(jax.device_put(x, sharding) for x in inputs)
        context = _mesh_context(mesh)
    stop_ids = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    settings = dict(
        cfg=cfg,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),  # validated above: exact conversions
        top_k=int(top_k),
        top_p=float(top_p),
        return_logits=return_logits,
        stream=stream,
    )
    with context:
        if speculative is None:
            out = _generate(variables, *inputs, stop_ids, jnp.int32(pad_id), jax.random.key(seed), **settings)
        else:
            from ling_jax.decoding.speculative import speculative_generate

            out = speculative_generate(
                variables,
                *inputs,
                stop_ids,
                jnp.int32(pad_id),
                jax.random.key(seed),
                draft_tokens=draft_tokens,
                **settings,
            )
    out = jax.device_get(out)
    return GenerateOutput(**{k: None if v is None else np.asarray(v) for k, v in out.items()})


@contextlib.contextmanager
def _mesh_context(mesh):
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
