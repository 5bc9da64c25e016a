"""First-order activation memory per device of one train step (a plan, not a measurement).

Per-device sizes: the batch is split over data x fsdp x expert (ling_jax/sharding/rules.py), so a
device holds b = batch / (data*fsdp*expert) sequences, N = b * T tokens; the model axis splits
heads, FFN widths and the vocabulary (it replicates tokens). Activations use `model.dtype`,
attention scores and logits float32 (as the layers compute them).

Terms (each is a line of the breakdown):
- saved across layers: what the backward pass needs from every layer, by `remat_policy`:
  "full" keeps each layer's input [N, D]; "save_attn_out" / "save_moe_out" add one / two [N, D]
  tensors; "save_dots" adds every matmul output without batch dimensions (projections, router,
  dense and shared FFN; for dense dispatch the [N, E, F] expert activations); "none" keeps all of
  a layer's intermediates. MTP layers are not rematerialised: they keep everything.
- one layer in backward: the recomputed intermediates of the largest layer plus their gradients
  (2x its forward intermediates; attention scores and probabilities dominate at long sequences).
- MoE dispatch buffers: part of a layer's intermediates, shown separately because they depend on
  `moe_dispatch` and on how GSPMD partitions it (the dispatch is written over the global batch;
  there is no explicit expert parallelism):
  "dense": every expert on every local token, [N, E, F] x3 and [N, E, D]. With an expert axis
  e > 1, tokens and experts are split on the same axis and GSPMD does not keep the experts local:
  counted as the tokens gathered over the axis with all experts computed for them (x e). Measured
  on Ling-1T (batch 512, model=8): e = 8 needed 288 GiB per device (this model: ~300), e = 128 /
  256 needed 306 / 341 GiB (this model: far more); either way such meshes do not fit.
  "ragged" / "blocked": one argsort of all B*T*k assignments of the GLOBAL batch, which GSPMD
  cannot split, so every device holds the sorted rows and outputs [B*T*k, D] and [B*T*k, F] x3
  (measured on Ling-1T: the compiler asked for 563 GiB per device; this model says more).
- logits: [N, V] float32 for the main head and each MTP head, plus one gradient of that size.
- gathered weights: FSDP all-gathers one layer's weights (in `dtype`) for its matmuls and
  produces that layer's full weight gradient before the reduce-scatter.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.sharding.rules import BATCH_AXES

F32 = 4  # bytes


@dataclasses.dataclass(frozen=True)
class LayerActivations:
    boundary: int  # the layer input [N, D]
    attention: int  # q/k/v (+ normed, roped), scores, probabilities, output, o_proj
    ffn: int  # norms, dense or shared FFN, router logits, residuals
    dispatch: int  # MoE dispatch buffers (0 in a dense layer)
    dots_saved: int  # what "save_dots" keeps

    @property
    def total(self) -> int:
        return self.boundary + self.attention + self.ffn + self.dispatch


def _split(size: int, ways: int) -> int:
    return math.ceil(size / ways)


def dispatch_bytes(cfg: ModelConfig, tokens: int, global_tokens: int, expert_ways: int, model_ways: int) -> int:
    """MoE dispatch buffers of one layer on one device (see the module docstring)."""
    dt = np.dtype(cfg.dtype).itemsize
    E, k, D = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
    F = _split(cfg.moe_intermediate_size, model_ways)
    if cfg.moe_dispatch == "dense":
        return expert_ways * (3 * tokens * E * F * dt + tokens * E * D * dt)
    rows = global_tokens * k
    return 2 * rows * D * dt + 3 * rows * F * dt


def layer_activations(cfg: ModelConfig, tokens: int, seqs: int, model_ways: int, is_moe: bool,
                      dispatch: int = 0) -> LayerActivations:
    """Forward intermediates of one decoder layer on one device (N = tokens, b = seqs); `dispatch`
    is the MoE dispatch buffers' bytes (`dispatch_bytes`)."""
    dt = np.dtype(cfg.dtype).itemsize
    D, Dh, T = cfg.hidden_size, cfg.head_dim, tokens // max(seqs, 1)
    H, K = _split(cfg.num_heads, model_ways), _split(cfg.num_kv_heads, model_ways)
    nd = tokens * D * dt
    qkv = tokens * (H + 2 * K) * Dh * dt
    scores = seqs * H * T * T * (F32 + dt)  # float32 scores + probabilities in dtype
    attention = 2 * qkv + scores + tokens * H * Dh * dt + nd  # raw and normed/roped q,k,v; output; o_proj
    residual_norms = 3 * nd  # input norm, residual after attention, post-attention norm
    dots_saved = qkv + nd  # q/k/v and o_proj outputs
    if not is_moe:
        F = _split(cfg.intermediate_size, model_ways)
        ffn = residual_norms + 3 * tokens * F * dt + nd
        return LayerActivations(nd, attention, ffn, 0, dots_saved + 2 * tokens * F * dt + nd)
    E = cfg.num_experts
    F, Fs = _split(cfg.moe_intermediate_size, model_ways), _split(cfg.shared_intermediate_size, model_ways)
    router = tokens * (D + E) * F32  # float32 input copy and logits
    shared = (3 * tokens * Fs * dt + nd) if cfg.num_shared_experts else 0
    ffn = residual_norms + router + shared + nd
    # Under "save_dots" the two [N, E, F] dots of dense dispatch (no batch dimension) are kept;
    # ragged_dot and the blocked custom VJP are not plain dots.
    dispatch_saved = 2 * tokens * E * F * dt if cfg.moe_dispatch == "dense" else 0
    saved = dots_saved + tokens * E * F32 + (2 * tokens * Fs * dt + nd if cfg.num_shared_experts else 0)
    return LayerActivations(nd, attention, ffn, dispatch, saved + dispatch_saved)


def _saved_per_layer(layer: LayerActivations, policy: str) -> int:
    return {
        "none": layer.total,
        "full": layer.boundary,
        "save_attn_out": 2 * layer.boundary,
        "save_moe_out": 3 * layer.boundary,
        "save_dots": layer.boundary + layer.dots_saved,
    }[policy]


def _layer_weight_count(cfg: ModelConfig, is_moe: bool) -> int:
    """Parameters of one decoder layer (the matrices FSDP gathers), in elements."""
    D, Dh = cfg.hidden_size, cfg.head_dim
    attention = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * Dh + cfg.num_heads * Dh * D
    if not is_moe:
        return attention + 3 * D * cfg.intermediate_size
    experts = 3 * cfg.num_experts * D * cfg.moe_intermediate_size
    return attention + experts + 3 * D * cfg.shared_intermediate_size + D * cfg.num_experts


def activation_breakdown(cfg: ModelConfig, batch_size: int, seq_len: int, mesh_sizes: dict[str, int]) -> dict[str, int]:
    """{term: bytes per device}; see the module docstring for each term."""
    batch_ways = math.prod(mesh_sizes[a] for a in BATCH_AXES)
    model_ways = mesh_sizes["model"]
    seqs = max(1, batch_size // batch_ways)
    tokens = seqs * seq_len
    dt = np.dtype(cfg.dtype).itemsize
    dense = layer_activations(cfg, tokens, seqs, model_ways, is_moe=False)
    dispatch = dispatch_bytes(cfg, tokens, batch_size * seq_len, mesh_sizes["expert"], model_ways)
    moe = layer_activations(cfg, tokens, seqs, model_ways, is_moe=True, dispatch=dispatch)
    stack_layers = ((cfg.num_dense_layers, dense), (cfg.num_moe_layers, moe))
    saved = sum(n * _saved_per_layer(layer, cfg.remat_policy) for n, layer in stack_layers)
    saved += cfg.num_mtp_layers * (moe.total + 3 * moe.boundary)  # not rematerialised; + enorm/hnorm/eh_proj
    largest = moe if cfg.num_moe_layers or cfg.num_mtp_layers else dense
    vocab = _split(cfg.vocab_size, model_ways)
    expert_ways = mesh_sizes["expert"]
    gathered = max(
        _layer_weight_count(cfg, is_moe=False) / model_ways,
        _layer_weight_count(cfg, is_moe=True) / (model_ways * expert_ways) if cfg.num_experts else 0,
    )
    return {
        "saved across layers": saved,
        "one layer in backward": 2 * largest.total,
        "logits (+ gradient)": (2 + cfg.num_mtp_layers) * tokens * vocab * F32,
        "gathered layer weights (+ grads)": int(2 * gathered * dt),
    } | {"  of which MoE dispatch": 2 * largest.dispatch}


def activation_bytes(breakdown: dict[str, int]) -> int:
    """The total of a breakdown (indented lines are parts of another line)."""
    return sum(v for k, v in breakdown.items() if not k.startswith(" "))
