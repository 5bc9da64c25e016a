"""Train state, optimizer and their shardings."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ling_jax.config import ModelConfig
from ling_jax.model import LingModel, init_ids
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES, logical_shardings
from ling_jax.train.config import TrainConfig
from ling_jax.train.schedule import wsm_schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
    params: Any
    expert_bias: Any  # float32 routing biases, updated by the balancing rule, not the optimizer
    opt_state: Any
    nonfinite_streak: jax.Array  # consecutive steps whose loss, gradients or updated state held NaN/Inf
    skipped_steps: jax.Array  # total steps skipped for non-finite values


def _decay_mask(params):
    """Weight decay on weight matrices only, not on norm scales (`scale`) or biases (`*bias`).

    Decided by the parameter's name, not its rank: a scanned stack adds a leading layer axis (a
    stack's norm scale is [L, D]), and q/k/v biases are [heads, head_dim].
    """

    def decay(path, _):
        # The last dict key names the parameter (a logical-axis box adds a trailing `.value`).
        name = next(str(p.key) for p in reversed(path) if hasattr(p, "key"))
        return not (name == "scale" or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW (beta 0.9/0.95, decay 0.1 on matrices) under the WSM schedule, global-norm clipping."""
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(
            wsm_schedule(train.learning_rate, train.warmup_steps),
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            mask=_decay_mask,
        ),
    )


def init_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state with logical-axis boxes kept (so shardings can be read from an abstract copy)."""
    variables = LingModel(model_cfg).init(rng, init_ids())
    params = variables["params"]
    return TrainState(
        step=jnp.int32(0),
        params=params,
        expert_bias=variables.get("expert_bias", {}),
        opt_state=optimizer.init(params),
        nonfinite_streak=jnp.int32(0),
        skipped_steps=jnp.int32(0),
    )


def state_shardings(model_cfg: ModelConfig, optimizer, mesh, rules=LOGICAL_AXIS_RULES):
    """(abstract unboxed state, NamedSharding tree) without allocating anything."""
    abstract = jax.eval_shape(lambda: init_state(model_cfg, optimizer, jax.random.key(0)))
    shardings = logical_shardings(nn.get_partition_spec(abstract), mesh, rules)
    return nn.unbox(abstract), shardings


def create_sharded_state(model_cfg: ModelConfig, optimizer, mesh, seed: int, rules=LOGICAL_AXIS_RULES):
    """Initialises the state directly into its shardings (each device builds only its shard)."""
    _, shardings = state_shardings(model_cfg, optimizer, mesh, rules)
    init = jax.jit(lambda rng: nn.unbox(init_state(model_cfg, optimizer, rng)), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(jax.random.key(seed)), shardings
