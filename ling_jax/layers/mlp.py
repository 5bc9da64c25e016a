"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import flax.linen as nn
import jax

from ling_jax.config import ModelConfig
from ling_jax.layers.basic import Einsum


class MLP(nn.Module):
    config: ModelConfig
    width: int

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        D, F = cfg.hidden_size, self.width
        args = (cfg.jnp_dtype, cfg.jnp_param_dtype, cfg.init_std)
        gate_BTF = Einsum((D, F), ("embed", "mlp"), *args, name="gate_proj")("BTD,DF->BTF", x_BTD)
        up_BTF = Einsum((D, F), ("embed", "mlp"), *args, name="up_proj")("BTD,DF->BTF", x_BTD)
        return Einsum((F, D), ("mlp", "embed"), *args, name="down_proj")("BTF,FD->BTD", nn.silu(gate_BTF) * up_BTF)
