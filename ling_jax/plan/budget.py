"""The compute budget of a planned run and what the Ling scaling laws say about it.

C = M x D with M = the training FLOPs per token of the config (`model_flops_per_token`: every
activated matmul parameter incl. MTP and lm_head, plus attention) and D = the planned tokens.
Efficiency leverage uses A = num_experts_per_tok / num_experts and G = `expert_granularity`
(hidden, expert width); the optimal LR and batch are the fitted laws of ling_jax/scaling.py.

Note: ling_jax.scaling reproduces the report's Table 1 with M without the lm_head and MTP layers;
this module's M includes them (it is what the run executes), so its C is larger than the paper's
(a few percent for Ling-1T; about a third for Ling-mini-2.0, whose 157K-vocabulary lm_head is a
large share of its small activated size) and the recommended LR correspondingly a little lower.
"""

from __future__ import annotations

import dataclasses

from ling_jax.config import ModelConfig
from ling_jax.scaling import efficiency_leverage, expert_granularity, recommend_hyperparameters
from ling_jax.train.flops import model_flops_per_token

DEFAULT_TOKENS = 20e12  # the Ling 2.0 4K-context pretraining stage (report Section 3.2.1)


@dataclasses.dataclass(frozen=True)
class Budget:
    flops_per_token: float
    tokens: float
    compute_flops: float
    activation_ratio: float
    granularity: float
    efficiency_leverage: float
    optimal_learning_rate: float
    optimal_batch_tokens: float
    optimal_batch_sequences: int


def plan_budget(cfg: ModelConfig, seq_len: int, tokens: float = DEFAULT_TOKENS) -> Budget:
    m = model_flops_per_token(cfg, seq_len)
    rec = recommend_hyperparameters(flops_per_token=m, tokens=tokens, seq_len=seq_len)
    ratio = cfg.num_experts_per_tok / cfg.num_experts
    granularity = expert_granularity(cfg.hidden_size, cfg.moe_intermediate_size)
    return Budget(
        flops_per_token=m,
        tokens=tokens,
        compute_flops=rec.compute_flops,
        activation_ratio=ratio,
        granularity=granularity,
        efficiency_leverage=efficiency_leverage(ratio, granularity, rec.compute_flops),
        optimal_learning_rate=rec.learning_rate,
        optimal_batch_tokens=rec.batch_tokens,
        optimal_batch_sequences=rec.batch_sequences,
    )
