"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import flax.linen as nn
import jax

from ling_jax.config import ModelConfig
from ling_jax.layers.basic import projection


class MLP(nn.Module):
    config: ModelConfig
    width: int

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        D, F = cfg.hidden_size, self.width
        gate_BTF = projection(cfg, (D, F), ("embed", "mlp"), "gate_proj")("BTD,DF->BTF", x_BTD)
        up_BTF = projection(cfg, (D, F), ("embed", "mlp"), "up_proj")("BTD,DF->BTF", x_BTD)
        return projection(cfg, (F, D), ("mlp", "embed"), "down_proj")("BTF,FD->BTD", nn.silu(gate_BTF) * up_BTF)
