"""What a layer takes besides its activations, for calling one layer on its own.

Inside `LingModel` the rotary tables, the attention mask and the token mask are computed once and
passed to every layer. To initialise and apply one component alone (e.g. to take `jax.grad` with
respect to its parameters), `layer_inputs` builds the same arguments for a batch of unpacked,
unpadded sequences (or for given positions / segment ids):

    cfg = ling_jax.configs.model_config("tiny")
    inputs = layer_inputs(cfg, batch_size=2, seq_len=16)
    attn = Attention(cfg)
    variables = attn.init(rng, x_BTD, inputs.cos_BTR, inputs.sin_BTR, inputs.mask_BTS)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import attention_mask
from ling_jax.ops.rope import rope_cos_sin


class LayerInputs(NamedTuple):
    """Rotary tables [B, T, R], the attention mask (as `attention_mask` returns it) and the token
    mask [B, T] (True = a real token, what MoE statistics count)."""

    cos_BTR: jax.Array
    sin_BTR: jax.Array
    mask_BTS: Any
    token_mask_BT: jax.Array


def layer_inputs(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
) -> LayerInputs:
    """The model's per-layer inputs for `batch_size` rows of `seq_len` tokens, computed as
    `LingModel` computes them: positions default to 0 .. T-1, segment ids to one segment per row
    (0 = padding, which is masked out of attention and of the token mask)."""
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    index_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len))
    if positions_BT is None:
        positions_BT = index_BT
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((batch_size, seq_len), jnp.int32)
    for name, value in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
        if tuple(value.shape) != (batch_size, seq_len):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {(batch_size, seq_len)}")
    cos_BTR, sin_BTR = rope_cos_sin(positions_BT, cfg)
    mask_BTS = attention_mask(segment_ids_BT, segment_ids_BT, index_BT, index_BT)
    return LayerInputs(cos_BTR, sin_BTR, mask_BTS, segment_ids_BT != 0)
