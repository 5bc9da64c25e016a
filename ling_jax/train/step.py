"""The pure train and eval steps. `make_train_step` jits one with explicit shardings and donation.

Sharding choice: the state (params, optimizer moments, expert biases) is laid out by the logical
rules table (fsdp over model width, experts over `expert`, heads/FFN over `model`); the batch is
split over (data, fsdp, expert). Everything else is left to GSPMD. The state is donated, so a
step updates it in place. Router counts are sums over the whole global batch (GSPMD inserts the
all-reduce), so the balancing update is identical on every device and for any mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from ling_jax.config import ModelConfig
from ling_jax.data import batch as batch_keys
from ling_jax.loss import lm_loss
from ling_jax.model import LingModel
from ling_jax.ops.fp8 import FP8_STATS, fp8_impl
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES, batch_spec, replicated
from ling_jax.train.balance import counts_like_bias, load_metrics, update_expert_bias
from ling_jax.train.config import TrainConfig
from ling_jax.train.schedule import wsm_schedule
from ling_jax.train.state import TrainState

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions [B, T] int32; loss_mask [B, T] float32


def _forward_loss(params, expert_bias, batch: Batch, model_cfg: ModelConfig, z_loss_weight: float):
    variables = {"params": params, "expert_bias": expert_bias}
    args = (batch[batch_keys.INPUTS], batch[batch_keys.POSITIONS], batch[batch_keys.SEGMENT_IDS])
    model = LingModel(model_cfg)
    fp8_stats = None
    if fp8_impl(model_cfg.fp8) is None:
        out = model.apply(variables, *args)
    else:  # FP8 projections sow their quantization statistics
        out, sown = model.apply(variables, *args, mutable=[FP8_STATS])
        fp8_stats = jax.tree.map(lambda t: t[0], sown[FP8_STATS], is_leaf=lambda x: isinstance(x, tuple))
    token_mask = batch[batch_keys.SEGMENT_IDS] != 0
    loss, metrics = lm_loss(
        out,
        batch[batch_keys.TARGETS],
        batch[batch_keys.LOSS_MASK],
        mtp_weight=model_cfg.mtp_loss_weight,
        z_loss_weight=z_loss_weight,
        token_mask_BT=token_mask,
    )
    if fp8_stats is not None:
        metrics["fp8_stats"] = fp8_stats
    return loss, (metrics, out.router, out.mtp_router)


def _optimizer_count(opt_state, default: jax.Array) -> jax.Array:
    """The step count the optimizer's LR schedule reads. It does not advance on skipped non-finite
    steps (their whole update, opt_state included, is dropped), so it can lag `TrainState.step`."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    return counts[0] if counts else default


def all_finite(tree) -> jax.Array:
    """True when every inexact leaf of `tree` holds only finite values (integer leaves always do)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, Any]]:
    grad_fn = jax.value_and_grad(_forward_loss, has_aux=True)
    (loss, (metrics, router, mtp_router)), grads = grad_fn(
        state.params, state.expert_bias, batch, model_cfg, train_cfg.z_loss_weight
    )
    grad_norm = optax.tree.norm(grads)

    counts_main = router.counts_E if router is not None else jnp.zeros((0, model_cfg.num_experts))
    counts_mtp = mtp_router.counts_E if mtp_router is not None else jnp.zeros((0, model_cfg.num_experts))

    def apply_update(operands):
        params, opt_state, expert_bias = operands
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if train_cfg.bias_update_rate and expert_bias:
            counts = counts_like_bias(model_cfg, counts_main, counts_mtp)
            expert_bias = update_expert_bias(expert_bias, counts, train_cfg.bias_update_rate)
        return params, opt_state, expert_bias

    old = (state.params, state.opt_state, state.expert_bias)
    # The guard also covers the updated state: a finite gradient can still give non-finite weights or
    # moments (e.g. an invalid optimizer setting, or an overflow). The would-be update is computed once
    # outside the cond only to be reduced to one flag: XLA fuses each leaf's update into its
    # all-finite reduction, so nothing is materialised and the donated buffers are updated in place
    # by the cond below, as before; the price is one more elementwise pass of the optimizer.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(apply_update(old))

    # A non-finite step skips the whole update (params, moments, biases). A cond rather than a
    # `where(finite, new, old)` per leaf: for such a where XLA:CPU copies every donated moment buffer
    # to keep its old value (158 copies in the bench-shape step; the update alone took 1.4x as long;
    # benchmarks/README.md).
    params, opt_state, expert_bias = jax.lax.cond(finite, apply_update, lambda operands: operands, old)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        expert_bias=expert_bias,
        opt_state=opt_state,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics)
    metrics.update(
        grad_norm=grad_norm,
        learning_rate=wsm_schedule(train_cfg.learning_rate, train_cfg.warmup_steps)(
            _optimizer_count(state.opt_state, state.step)
        ),
        finite=finite,
        expert_counts=counts_main,
        moe_dropped=sum((jnp.sum(r.dropped) for r in (router, mtp_router) if r is not None), jnp.zeros((), jnp.int32)),
        **load_metrics(counts_main if counts_main.shape[0] else jnp.ones((1, model_cfg.num_experts))),
    )
    return new_state, metrics


def eval_step(params, expert_bias, batch: Batch, *, model_cfg: ModelConfig) -> dict[str, jax.Array]:
    """Summed next-token CE and token count (MTP excluded), for held-out loss."""
    out = LingModel(model_cfg).apply(
        {"params": params, "expert_bias": expert_bias},
        batch[batch_keys.INPUTS],
        batch[batch_keys.POSITIONS],
        batch[batch_keys.SEGMENT_IDS],
        with_mtp=False,
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch[batch_keys.TARGETS])
    mask = batch[batch_keys.LOSS_MASK].astype(jnp.float32)
    return {"ce_sum": (ce * mask).sum(), "tokens": mask.sum()}


def make_train_step(
    model_cfg: ModelConfig, train_cfg: TrainConfig, optimizer, mesh, state_shardings, rules=LOGICAL_AXIS_RULES
):
    """The train step jitted once: explicit in/out shardings, donated state."""
    batch_sharding = NamedSharding(mesh, batch_spec())
    step = functools.partial(train_step, model_cfg=model_cfg, train_cfg=train_cfg, optimizer=optimizer)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    run.jitted = jitted
    return run


def make_eval_step(model_cfg: ModelConfig, mesh, state_shardings, rules=LOGICAL_AXIS_RULES):
    batch_sharding = NamedSharding(mesh, batch_spec())
    jitted = jax.jit(
        functools.partial(eval_step, model_cfg=model_cfg),
        in_shardings=(state_shardings.params, state_shardings.expert_bias, batch_sharding),
        out_shardings=replicated(mesh),
    )

    def run(params, expert_bias, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(params, expert_bias, batch)

    return run
