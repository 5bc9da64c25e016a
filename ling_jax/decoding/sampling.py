"""Next-token sampling from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


def filter_logits(logits_BV, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """float32 logits / temperature with everything outside the top-k / top-p set at -inf: softmax of
    the result is the distribution `sample_logits` draws from (temperature > 0). Works on any leading
    shape (the vocabulary is the last axis); speculative decoding filters draft and target alike."""
    validate_sampling(temperature, top_k, top_p, logits_BV.shape[-1])
    if temperature == 0.0:
        raise ValueError("filter_logits needs temperature > 0 (temperature 0 is argmax)")
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][..., -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_logits(logits_BV, rng, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Token ids [B] int32. temperature == 0 is greedy (argmax, lowest id on ties); top_k == 0 and
    top_p == 1 disable those filters. Filters apply to the temperature-scaled logits. The settings
    are Python values, checked at trace time (`validate_sampling`)."""
    validate_sampling(temperature, top_k, top_p, logits_BV.shape[-1])
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)


def token_logprobs(logits_BTV, tokens_BT) -> jax.Array:
    """log softmax(float32 logits)[token] [B, T]: a token's log-prob under the unfiltered model
    distribution at temperature 1 (what an RL objective's ratio needs), without a [B, T, V] output."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    picked_BT = jnp.take_along_axis(logits_BTV, tokens_BT[..., None], axis=-1)[..., 0]
    return picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def validate_sampling(temperature: float, top_k: int, top_p: float, vocab_size: int) -> None:
    """Raises ValueError naming the argument unless temperature is a finite number >= 0, top_k an
    integer in [0, vocab_size] and top_p a number in (0, 1]. Nothing is rounded: top_k=2.7 is an error."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool):
        raise ValueError(f"top_k must be an integer (0: no top-k filter), got {type(top_k).__name__} {top_k!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [0, vocab_size={vocab_size}], got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
