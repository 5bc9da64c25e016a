"""Model FLOPs per token and the measured matmul peak, for model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.params import count_params
from ling_jax.scaling import training_flops_per_token


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x every activated matmul parameter (layers,
    MTP layers and the lm_head, which the main stack and every MTP layer apply; the embedding lookup
    is no matmul) + the attention score/value term 12 x layers x (heads x head_dim) x seq_len."""
    counts = count_params(cfg)
    lm_head = cfg.hidden_size * cfg.vocab_size * (1 + cfg.num_mtp_layers)
    matmul_params = counts.activated_non_embedding + counts.mtp_activated + lm_head
    return training_flops_per_token(
        activated_params_non_embedding=matmul_params,
        num_layers=cfg.num_layers + cfg.num_mtp_layers,
        attention_width=cfg.num_heads * cfg.head_dim,
        seq_len=seq_len,
    )


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one device on a jitted square matmul (median of `repeats`), the MFU denominator
    when no peak is configured."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)  # not zeros/ones:
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()  # (GPUs multiply constant data measurably faster)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / float(np.median(times))
