"""Ling scaling laws: MoE efficiency leverage and compute-optimal learning rate / batch size.

Sources: the Ling scaling-law paper (arXiv 2507.17702) and the Ling 2.0 report (arXiv 2510.22115,
Sections 2.3 and 3.2.1, Table 1). Units used throughout this module:

- Compute C is in FLOPs and is C = M * D (report Section 2.3.1), where D is the number of training
  tokens and M the training FLOPs per token without the embedding / lm_head:
      M = 6 * N_act + 12 * n_layer * d_attn * l_seq
  N_act = activated non-embedding parameters (attention, the dense FFN or the shared + top-k routed
  experts, router), d_attn = num_heads * head_dim, l_seq = the pretraining sequence length. The
  second term is the attention score / value matmuls (2 matmuls * 2 FLOPs * l_seq * d_attn forward,
  x3 for forward + backward), counted over the full sequence as in DeepSeek LLM's M.
- The batch-size law returns TOKENS; divide by l_seq for sequences.

Why these units: with D = 20T tokens (the 4K-context pretraining stage, report Section 3.2.1) and
M as above from the Table 1 architectures, the laws reproduce the published Table 1 figures:

    model            C (FLOPs)   lr pred / published      batch pred / published (4K sequences)
    Ling-mini-2.0    1.350e23    3.365e-4 / 3.36e-4       4,546 / 4,400  (+3.3%)
    Ling-flash-2.0   7.126e23    2.609e-4 / 2.61e-4       8,336 / 8,352  (-0.2%)
    Ling-1T          6.462e24    1.862e-4 / 1.86e-4      18,616 / 18,144 (+2.6%)

The learning rates agree to 0.1%. Dropping the attention term (C = 6 N_act D) or counting the
embeddings moves the learning rates by 2-7% and the batches by up to 22%; reading B as sequences
instead of tokens is off by a factor of 4096. (The published batches are rounded, presumably to a
multiple of the data-parallel size, which is why they match less tightly than the learning rates.)
"""

from __future__ import annotations

import dataclasses
import math

# eta_opt = LR_COEF * C^LR_EXP, B_opt = BATCH_COEF * C^BATCH_EXP (tokens); report Figure 1a.
LR_COEF, LR_EXP = 1.1576, -0.1529
BATCH_COEF, BATCH_EXP = 0.0694, 0.3644

# Efficiency-leverage fit (paper Eq. for EL(A, G, C); report Eq. 1).
EL_A, EL_D = 1.23, -0.0761
EL_GAMMA, EL_BETA = 0.0167, -0.117
EL_A_START, EL_A_MAX = 0.0163, 5.28e16


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def saturated_activation_ratio(activation_ratio: float) -> float:
    """Ahat, the saturating transform of the activation ratio A (Clark et al. 2022 form).

    1/Ahat = 1/(A + (1/A_start - 1/A_max)^-1) + 1/A_max, A_start = 0.0163, A_max = 5.28e16.
    For small A it behaves like A + A_start (so Ahat does not go to 0 as A -> 0); Ahat(1) ~ 1.016.
    """
    a = float(activation_ratio)
    if not (math.isfinite(a) and 0.0 < a <= 1.0):
        raise ValueError(f"activation_ratio must be in (0, 1], got {activation_ratio!r}")
    offset = 1.0 / (1.0 / EL_A_START - 1.0 / EL_A_MAX)
    return 1.0 / (1.0 / (a + offset) + 1.0 / EL_A_MAX)


def efficiency_leverage(activation_ratio: float, granularity: float, compute_flops: float) -> float:
    """Efficiency leverage EL = dense compute / MoE compute at equal loss (Ling scaling law).

        EL(A, G, C) = Ahat^(alpha + gamma * (log2 G)^2 + beta * log2 G),  alpha = a + d * log10 C
        a = 1.23, d = -0.0761, gamma = 0.0167, beta = -0.117 (Ahat: `saturated_activation_ratio`)

    Args:
      activation_ratio: A = routed experts activated per token / routed experts, in (0, 1]
        (Ling 2.0: 8 / 256 = 3.125%; the shared expert is not counted).
      granularity: G = 2 * d_model / d_expert (`expert_granularity`); Ling 2.0 has G = 8, which
        equals its number of activated experts.
      compute_flops: C in FLOPs (see the module docstring for C = M * D).

    Log bases (the papers write plain "log"): log10 for C is the only choice that gives a sane EL
    (natural log puts EL(3.1%, 12, 1e22) near 5,000). For G both ln and log2 give EL ~ 7 for that
    example (6.85 and 7.22), but the log-polynomial in G has its optimum at
    G* = base^(-beta / (2 gamma)) = base^3.50, i.e. G* = 11.3 for log2 and 33 for ln; the report
    states the fitted optimum range is 8-12, so log2 is the base consistent with the fit. Note that
    the exponent decreases with C (d < 0) while log Ahat < 0, so EL grows with compute as reported.
    """
    a_hat = saturated_activation_ratio(activation_ratio)
    g = _check_positive("granularity", granularity)
    c = _check_positive("compute_flops", compute_flops)
    log_g = math.log2(g)
    exponent = EL_A + EL_D * math.log10(c) + EL_GAMMA * log_g**2 + EL_BETA * log_g
    return a_hat**exponent


def optimal_granularity() -> float:
    """The G maximising EL at any A < 1 and C: 2^(-beta / (2 gamma)) ~ 11.3 (log2 convention)."""
    return 2.0 ** (-EL_BETA / (2.0 * EL_GAMMA))


def expert_granularity(d_model: int, d_expert: int) -> float:
    """G = 2 * d_model / d_expert, the granularity the EL law is fitted in (8 for all Ling 2.0 sizes)."""
    return 2.0 * _check_positive("d_model", d_model) / _check_positive("d_expert", d_expert)


def optimal_learning_rate(compute_flops: float) -> float:
    """eta_opt = 1.1576 * C^-0.1529 (peak AdamW LR), C in FLOPs."""
    return LR_COEF * _check_positive("compute_flops", compute_flops) ** LR_EXP


def optimal_batch_size(compute_flops: float) -> float:
    """B_opt = 0.0694 * C^0.3644 in TOKENS per optimizer step, C in FLOPs."""
    return BATCH_COEF * _check_positive("compute_flops", compute_flops) ** BATCH_EXP


def moe_activated_params_non_embedding(
    *,
    num_layers: int,
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dense_ffn: int,
    expert_ffn: int,
    num_dense_layers: int,
    num_experts: int,
    experts_per_token: int,
    num_shared_experts: int,
) -> int:
    """N_act: parameters a token passes through, without embeddings, lm_head, norms and MTP layers.

    Per layer: attention d * (H + 2K) * Dh (fused qkv) + H * Dh * d (output); a dense layer adds
    3 * d * F (SwiGLU); an MoE layer adds (top-k + shared) * 3 * d * F_e plus the router d * E.
    Gives 789M for Ling-mini-2.0, as published.
    """
    if not 0 <= num_dense_layers <= num_layers:
        raise ValueError(f"num_dense_layers must be in [0, num_layers], got {num_dense_layers}")
    attention = d_model * (num_heads + 2 * num_kv_heads) * head_dim + num_heads * head_dim * d_model
    dense = 3 * d_model * dense_ffn
    moe = (experts_per_token + num_shared_experts) * 3 * d_model * expert_ffn + d_model * num_experts
    return num_layers * attention + num_dense_layers * dense + (num_layers - num_dense_layers) * moe


def training_flops_per_token(
    *, activated_params_non_embedding: float, num_layers: int, attention_width: int, seq_len: int
) -> float:
    """M = 6 * N_act + 12 * n_layer * d_attn * l_seq: training FLOPs per token (fwd + bwd)."""
    n = _check_positive("activated_params_non_embedding", activated_params_non_embedding)
    layers = _check_positive("num_layers", num_layers)
    width = _check_positive("attention_width", attention_width)
    seq = _check_positive("seq_len", seq_len)
    return 6.0 * n + 12.0 * layers * width * seq


@dataclasses.dataclass(frozen=True)
class HyperparameterRecommendation:
    """Compute-optimal peak LR and batch for a budget C = flops_per_token * tokens."""

    compute_flops: float
    learning_rate: float
    batch_tokens: float  # B_opt exactly as the law gives it
    batch_sequences: int  # B_opt / seq_len rounded to the nearest whole sequence (>= 1)


def recommend_hyperparameters(*, flops_per_token: float, tokens: float, seq_len: int) -> HyperparameterRecommendation:
    """Peak LR and batch for a run of `tokens` tokens at `flops_per_token` (M, see module docstring)."""
    m = _check_positive("flops_per_token", flops_per_token)
    d = _check_positive("tokens", tokens)
    seq = _check_positive("seq_len", seq_len)
    compute = m * d
    batch_tokens = optimal_batch_size(compute)
    return HyperparameterRecommendation(
        compute_flops=compute,
        learning_rate=optimal_learning_rate(compute),
        batch_tokens=batch_tokens,
        batch_sequences=max(1, round(batch_tokens / seq)),
    )
