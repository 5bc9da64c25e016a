"""First-order activation memory per device of one train step (a plan, not a measurement).

Per-device sizes: with gradient accumulation (`train.microbatches` = k) a step holds the
activations of one microbatch of batch / k rows at a time (the scan in ling_jax/train/step.py),
plus a float32 gradient accumulator (counted with the state, ling_jax/plan/search.py). A
microbatch is split over data x fsdp x expert and the sequence over context
(ling_jax/sharding/rules.py), so a device holds b = batch / (k*data*fsdp*expert) sequences of
T = seq_len / context positions, N = b * T tokens; the model axis splits heads, FFN widths and the
vocabulary (it replicates tokens). With context > 1 attention gathers every sequence's keys and
values (S = seq_len keys per query; ling_jax/ops/context_parallel.py). A flash kernel (splash on
TPU, cuDNN on GPU) keeps no scores, only a float32 log-sum-exp per query and head. Activations use `model.dtype`,
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
  `moe_dispatch` and the mesh. Under a mesh the routed experts run per shard (ling_jax/layers/moe.py:
  a shard_map over the batch axes), so every buffer is sized by the device's own N tokens; F below
  is the expert width over the model axis (each device computes its F-slice).
  expert = 1: every device runs all E experts on its tokens. "dense": [N, E, F] x3 and [N, E, D];
  "ragged" / "blocked": the N*k expert-sorted assignments, [N*k, D] x2 and [N*k, F] x3 (blocked
  adds at most E*(b-1) padding rows, not counted).
  expert = e > 1 (ling_jax/ops/expert_parallel.py, dropless): each device receives a buffer of
  C = N rows from each of the e shards, so it computes e*N received rows with its E/e experts,
  kl = min(k, E/e) expert slots a row; the send / receive buffers of x and of the outputs add
  4 x [e*N, D]. "dense": [e*N, E/e, F] x3 and [e*N, E/e, D] (the same as expert = 1);
  "ragged" / "blocked": [e*N*kl, D] x2 and [e*N*kl, F] x3.
  With `moe_capacity_factor` cf > 0 the send buffers hold C = min(N, ceil(cf*N*k/e)) rows each and
  "ragged" / "blocked" run A = min(e*C*kl, e*ceil(cf*N*k/e)) compacted assignments instead of e*C*kl.
  (Before the per-shard dispatch, ragged / blocked sorted the GLOBAL batch's assignments, which
  GSPMD cannot split: Ling-1T at batch 512 on v5p:16x16x16 needed 563 GiB per device.)
- logits: [N, V] float32 for the main head and each MTP head, plus one gradient of that size.
- gathered weights: FSDP all-gathers a layer's weights (in `dtype`) for its matmuls, in the forward
  and again in the backward recompute, each gather of the next layer overlapping the current one
  (4 copies), and produces that layer's full weight gradient in float32 before the reduce-scatter:
  4 x dtype + 4 bytes per element of the largest layer (per device: over model, and expert for the
  routed experts). Calibrated on one compile (2026-12-07): Ling-1T on v5p:8x8x16, mesh fsdp=16
  expert=2 context=32, whose compiled size at 9 and 27 microbatches extrapolates to 77 GiB that
  does not shrink with the microbatch beyond the state; this term gives 72 GiB there (2 x dtype,
  the earlier term, gave 24 GiB and ranked that mesh first although no microbatch count fits it).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.ops.expert_parallel import receive_capacity, send_capacity
from ling_jax.sharding.rules import mesh_axes

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


def dispatch_bytes(cfg: ModelConfig, tokens: int, expert_ways: int, model_ways: int) -> int:
    """MoE dispatch buffers of one layer on one device with `tokens` local tokens (module docstring)."""
    dt = np.dtype(cfg.dtype).itemsize
    E, k, D = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
    F = _split(cfg.moe_intermediate_size, model_ways)
    rows, experts, exchange = tokens, E, 0
    assignments = tokens * k
    if expert_ways > 1:
        cf = cfg.expert_capacity_factor
        C = send_capacity(tokens, k, expert_ways, cf)
        rows, experts = expert_ways * C, E // expert_ways
        exchange = 4 * rows * D * dt
        assignments = receive_capacity(tokens, k, expert_ways, cf, C, min(k, experts))
    if cfg.moe_dispatch == "dense":
        return exchange + 3 * rows * experts * F * dt + rows * experts * D * dt
    return exchange + 2 * assignments * D * dt + 3 * assignments * F * dt


def layer_activations(
    cfg: ModelConfig,
    tokens: int,
    seqs: int,
    model_ways: int,
    is_moe: bool,
    dispatch: int = 0,
    keys: int | None = None,
    flash: bool = False,
) -> LayerActivations:
    """Forward intermediates of one decoder layer on one device (N = tokens, b = seqs); `dispatch`
    is the MoE dispatch buffers' bytes (`dispatch_bytes`); `keys`: keys per query (default the local
    length; the whole sequence under context parallelism); `flash`: a kernel that keeps no scores."""
    dt = np.dtype(cfg.dtype).itemsize
    D, Dh, T = cfg.hidden_size, cfg.head_dim, tokens // max(seqs, 1)
    S = T if keys is None else keys
    H, K = _split(cfg.num_heads, model_ways), _split(cfg.num_kv_heads, model_ways)
    nd = tokens * D * dt
    qkv = tokens * (H + 2 * K) * Dh * dt
    # float32 scores + probabilities in dtype; a flash kernel: a float32 log-sum-exp per query and head
    scores = seqs * H * T * F32 if flash else seqs * H * T * S * (F32 + dt)
    gathered_kv = seqs * (S - T) * 2 * K * Dh * dt  # the other context shards' keys and values
    attention = 2 * qkv + scores + gathered_kv + tokens * H * Dh * dt + nd  # q,k,v raw and normed/roped; out
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


def activation_breakdown(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    mesh_sizes: dict[str, int],
    *,
    microbatches: int = 1,
    flash: bool = False,
) -> dict[str, int]:
    """{term: bytes per device} of one microbatch of batch_size / microbatches rows; see the module
    docstring for each term."""
    batch_ways = math.prod(mesh_sizes[a] for a in mesh_axes("activation_batch", mesh_sizes))
    context = math.prod(mesh_sizes[a] for a in mesh_axes("activation_length", mesh_sizes))
    model_ways = mesh_sizes["model"]
    seqs = max(1, batch_size // microbatches // batch_ways)
    tokens = seqs * _split(seq_len, context)
    dt = np.dtype(cfg.dtype).itemsize
    dense = layer_activations(cfg, tokens, seqs, model_ways, is_moe=False, keys=seq_len, flash=flash)
    dispatch = dispatch_bytes(cfg, tokens, mesh_sizes["expert"], model_ways)
    moe = layer_activations(cfg, tokens, seqs, model_ways, is_moe=True, dispatch=dispatch, keys=seq_len, flash=flash)
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
        "gathered layer weights (+ grads)": int(gathered * (4 * dt + F32)),
    } | {"  of which MoE dispatch": 2 * largest.dispatch}


def activation_bytes(breakdown: dict[str, int]) -> int:
    """The total of a breakdown (indented lines are parts of another line)."""
    return sum(v for k, v in breakdown.items() if not k.startswith(" "))
