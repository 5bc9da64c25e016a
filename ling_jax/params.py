"""Parameter counts from abstract shapes (`jax.eval_shape`: nothing is allocated)."""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import linen as nn
from flax import traverse_util

from ling_jax.config import ModelConfig
from ling_jax.model import LingModel, init_ids


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int  # main model (embeddings, all layers, final norm, lm_head), MTP excluded
    activated: int  # per token: routed experts counted top-k of num_experts
    embedding: int  # input embedding + lm_head (once if tied)
    mtp_total: int  # the MTP layers (the published totals exclude them)
    mtp_activated: int

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def activated_non_embedding(self) -> int:
        return self.activated - self.embedding


def abstract_params(config: ModelConfig):
    shapes = jax.eval_shape(lambda: LingModel(config).init(jax.random.key(0), init_ids()))
    return nn.unbox(shapes)["params"]


def count_params(config: ModelConfig) -> ParamCounts:
    flat = traverse_util.flatten_dict(abstract_params(config))
    routed_fraction = config.num_experts_per_tok / config.num_experts
    total = activated = embedding = mtp_total = mtp_activated = 0
    for path, leaf in flat.items():
        n = math.prod(leaf.shape)
        is_routed = "moe" in path and path[-1] in ("gate_proj", "up_proj", "down_proj")
        active = n * routed_fraction if is_routed else n
        if path[0].startswith("mtp_"):
            mtp_total += n
            mtp_activated += active
            continue
        total += n
        activated += active
        if path[0] in ("embedding", "lm_head"):
            embedding += n
    return ParamCounts(total, round(activated), embedding, mtp_total, round(mtp_activated))
