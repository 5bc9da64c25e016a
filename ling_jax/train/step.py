"""The pure train and eval steps. `make_train_step` jits one with explicit shardings and donation.

Gradient accumulation (`train.microbatches` = k > 1): the global batch of B rows is cut into k
microbatches of B/k rows, row i going to microbatch i mod k, so each microbatch is spread evenly
over the batch shards (a local reshape, no communication). A `lax.scan` runs forward and backward
per microbatch, summing float32 gradients, router counts and loss terms. Every loss term is
normalised by its token count over the WHOLE global batch (computed from the batch before the
scan), so the summed loss and gradients are those of one pass over the B rows, and the optimizer
update, the NaN guard and the aux-loss-free bias update see the global batch exactly as k = 1
does. Any number of rows that is a multiple of B/k traces a step with that many microbatches (the
batch ramp, ling_jax/train/ramp.py; jit compiles once per distinct batch size).

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

from ling_jax.config import ConfigError, ModelConfig
from ling_jax.data import batch as batch_keys
from ling_jax.loss import lm_loss, masked_cross_entropy, mtp_targets, router_z_loss
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


def _global_counts(batch: Batch, model_cfg: ModelConfig) -> dict[str, jax.Array]:
    """Token counts of the whole global batch that normalise each loss term (float32 scalars):
    the next-token CE's, each MTP layer's and the router z-loss's (real tokens)."""
    mask_BT = batch[batch_keys.LOSS_MASK].astype(jnp.float32)
    counts = {
        "ce": mask_BT.sum(),
        "tokens": (batch[batch_keys.SEGMENT_IDS] != 0).astype(jnp.float32).sum(),
        "mtp": jnp.stack(
            [mtp_targets(batch[batch_keys.TARGETS], mask_BT, i)[1].sum() for i in range(model_cfg.num_mtp_layers)]
        )
        if model_cfg.num_mtp_layers
        else jnp.zeros((0,), jnp.float32),
    }
    return jax.tree.map(lambda c: jnp.maximum(c, 1.0), counts)


def _microbatch_loss(params, expert_bias, batch: Batch, counts, model_cfg: ModelConfig, z_loss_weight: float):
    """One microbatch's share of the global batch's loss: each term of `lm_loss` (CE, mean over MTP
    layers of their CE, router z-loss) as this microbatch's masked sum over the global batch's count
    of that term (`counts`), so the shares of all microbatches add up to the global batch's loss."""
    variables = {"params": params, "expert_bias": expert_bias}
    args = (batch[batch_keys.INPUTS], batch[batch_keys.POSITIONS], batch[batch_keys.SEGMENT_IDS])
    model = LingModel(model_cfg)
    fp8_stats = None
    if fp8_impl(model_cfg.fp8) is None:
        out = model.apply(variables, *args)
    else:
        out, sown = model.apply(variables, *args, mutable=[FP8_STATS])
        fp8_stats = jax.tree.map(lambda t: t[0], sown[FP8_STATS], is_leaf=lambda x: isinstance(x, tuple))
    targets_BT, mask_BT = batch[batch_keys.TARGETS], batch[batch_keys.LOSS_MASK]
    mean, count = masked_cross_entropy(out.logits, targets_BT, mask_BT)
    metrics = {"ce_loss": mean * count / counts["ce"], "tokens": count}
    total = metrics["ce_loss"]
    if out.mtp_logits is not None and out.mtp_logits.shape[0]:
        parts = []
        for i in range(out.mtp_logits.shape[0]):
            mean_i, count_i = masked_cross_entropy(out.mtp_logits[i], *mtp_targets(targets_BT, mask_BT, i))
            parts.append(mean_i * count_i / counts["mtp"][i])
        metrics["mtp_loss"] = jnp.mean(jnp.stack(parts))
        total = total + model_cfg.mtp_loss_weight * metrics["mtp_loss"]
    if z_loss_weight:
        token_mask_BT = batch[batch_keys.SEGMENT_IDS] != 0
        tokens = token_mask_BT.astype(jnp.float32).sum()
        metrics["z_loss"] = router_z_loss(out, token_mask_BT) * tokens / counts["tokens"]
        total = total + z_loss_weight * metrics["z_loss"]
    metrics["loss"] = total
    if fp8_stats is not None:
        metrics["fp8_stats"] = fp8_stats
    return total, (metrics, out.router, out.mtp_router)


def split_microbatches(x_BT: jax.Array, microbatches: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with row i in microbatch i mod k: with B split in contiguous blocks
    over the batch shards and B/k divisible by their number, every microbatch is spread evenly over
    the shards and the split moves no data."""
    B = x_BT.shape[0]
    x_kB = jnp.swapaxes(x_BT.reshape(B // microbatches, microbatches, *x_BT.shape[1:]), 0, 1)
    logical = (None, "activation_batch") + ("activation_length",) * (x_BT.ndim - 1)
    return nn.with_logical_constraint(x_kB, logical[: x_kB.ndim])


def microbatch_count(batch_rows: int, train_cfg: TrainConfig) -> int:
    """Microbatches of `train_cfg.microbatch_size` rows in a batch of `batch_rows` (raises ConfigError
    when they do not divide it)."""
    rows = train_cfg.microbatch_size
    if batch_rows % rows:
        raise ConfigError(
            "train.microbatches",
            f"a batch of {batch_rows} rows is not a whole number of microbatches of {rows} rows "
            f"(train.batch_size={train_cfg.batch_size} / train.microbatches={train_cfg.microbatches})",
        )
    return batch_rows // rows


def _accumulated_grads(params, expert_bias, batch: Batch, microbatches: int, model_cfg, z_loss_weight: float):
    """(loss, (metrics, counts_main, counts_mtp, dropped), grads) summed over the microbatches by a scan;
    gradients accumulate in float32 and are returned in each parameter's dtype."""
    counts = _global_counts(batch, model_cfg)
    micro = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)
    grad_fn = jax.value_and_grad(_microbatch_loss, has_aux=True)
    E = model_cfg.num_experts

    def body(acc, mb):
        (_, (metrics, router, mtp_router)), grads = grad_fn(params, expert_bias, mb, counts, model_cfg, z_loss_weight)
        fp8_stats = metrics.pop("fp8_stats", None)
        new = {
            "grads": jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc["grads"], grads),
            "metrics": jax.tree.map(jnp.add, acc["metrics"], metrics),
            "counts_main": acc["counts_main"] + (router.counts_E if router is not None else 0),
            "counts_mtp": acc["counts_mtp"] + (mtp_router.counts_E if mtp_router is not None else 0),
            "dropped": acc["dropped"]
            + sum((jnp.sum(r.dropped) for r in (router, mtp_router) if r is not None), jnp.zeros((), jnp.int32)),
        }
        return new, fp8_stats

    # The carry's shapes and dtypes, from one abstract microbatch (nothing is computed).
    first = jax.tree.map(lambda x: x[0], micro)
    (_, (m_shape, r_shape, mr_shape)), _ = jax.eval_shape(
        functools.partial(grad_fn, model_cfg=model_cfg, z_loss_weight=z_loss_weight), params, expert_bias, first, counts
    )
    m_shape.pop("fp8_stats", None)
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    init = {
        "grads": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        "metrics": jax.tree.map(zeros, m_shape),
        "counts_main": jnp.zeros(r_shape.counts_E.shape if r_shape is not None else (0, E), jnp.float32),
        "counts_mtp": jnp.zeros(mr_shape.counts_E.shape if mr_shape is not None else (0, E), jnp.float32),
        "dropped": jnp.zeros((), jnp.int32),
    }
    acc, fp8_stats = jax.lax.scan(body, init, micro)
    metrics = acc["metrics"]
    if fp8_stats is not None:  # quantization statistics: the mean over microbatches
        metrics["fp8_stats"] = jax.tree.map(lambda s: jnp.mean(s, axis=0), fp8_stats)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), acc["grads"], params)
    return metrics["loss"], (metrics, acc["counts_main"], acc["counts_mtp"], acc["dropped"]), grads


def loss_and_grads(params, expert_bias, batch: Batch, *, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """(loss, (metrics, counts_main [L_moe, E], counts_mtp [M, E], dropped), grads) of the global batch:
    one pass, or a scan over its microbatches (module docstring) when it holds more than one."""
    microbatches = microbatch_count(batch[batch_keys.INPUTS].shape[0], train_cfg)
    if microbatches > 1:
        return _accumulated_grads(params, expert_bias, batch, microbatches, model_cfg, train_cfg.z_loss_weight)
    grad_fn = jax.value_and_grad(_forward_loss, has_aux=True)
    (loss, (metrics, router, mtp_router)), grads = grad_fn(
        params, expert_bias, batch, model_cfg, train_cfg.z_loss_weight
    )
    counts_main = router.counts_E if router is not None else jnp.zeros((0, model_cfg.num_experts))
    counts_mtp = mtp_router.counts_E if mtp_router is not None else jnp.zeros((0, model_cfg.num_experts))
    dropped = sum((jnp.sum(r.dropped) for r in (router, mtp_router) if r is not None), jnp.zeros((), jnp.int32))
    return loss, (metrics, counts_main, counts_mtp, dropped), grads


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
    loss, (metrics, counts_main, counts_mtp, dropped), grads = loss_and_grads(
        state.params, state.expert_bias, batch, model_cfg=model_cfg, train_cfg=train_cfg
    )
    grad_norm = optax.tree.norm(grads)

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
        moe_dropped=dropped,
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
