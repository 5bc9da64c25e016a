"""The RL update: teacher-forced log-probs of sampled responses, and one jitted, sharded, donated
policy-gradient step (policy_loss + beta * KL to the frozen reference) on them.

A batch holds R = P * G rows laid out as the sampler saw them: the prompt left-padded to a width
Tp (padding has segment id 0 and position 0, each prompt's positions start at 0), then the N
response slots. `inputs` / `targets` are that row shifted by one (width Tp + N - 1), so the logits
at input column Tp - 1 + n predict response token n: the response-aligned log-probs are columns
[Tp - 1, Tp - 1 + N) of the teacher-forced ones, the same [R, N] layout as the sampler's.

Sharding choice: the state keeps the train state's layout (ling_jax/train/state.py, from the
logical rules table); every batch array is split over its rows on the mesh axes of
"activation_batch" (data, fsdp, expert) and replicated across the others; GSPMD does the rest,
so the loss and its gradient are the same on any mesh. Expert biases are not updated in RL (the
sampler and the trainer route identically within an iteration); a step whose loss, gradient or
updated state is not finite is skipped whole, as in pre-training.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ling_jax.config import ModelConfig
from ling_jax.model import LingModel
from ling_jax.rl.objectives import policy_loss
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES, batch_spec, replicated
from ling_jax.train.state import TrainState
from ling_jax.train.step import all_finite

# Batch keys. [R, W] int32 with W = Tp + N - 1: the teacher-forced model inputs.
INPUTS, TARGETS, POSITIONS, SEGMENT_IDS = "inputs", "targets", "positions", "segment_ids"
# [R, N]: response-aligned.
OLD_LOGP, REF_LOGP, MASK, UNIT_IDS = "old_logp", "ref_logp", "mask", "unit_ids"
ADVANTAGES = "advantages"  # [R] float32


def response_logprobs(params, expert_bias, batch, *, model_cfg: ModelConfig, num_new: int):
    """([R, N] float32 log-probs of the response tokens, [R, N] float32 entropies of the policy)."""
    out = LingModel(model_cfg).apply(
        {"params": params, "expert_bias": expert_bias},
        batch[INPUTS],
        batch[POSITIONS],
        batch[SEGMENT_IDS],
        with_mtp=False,
    )
    start = batch[INPUTS].shape[1] - num_new  # = Tp - 1
    logits_RNV = out.logits[:, start:].astype(jnp.float32)
    logp_RNV = jax.nn.log_softmax(logits_RNV, axis=-1)
    targets_RN = batch[TARGETS][:, start:]
    logp_RN = jnp.take_along_axis(logp_RNV, targets_RN[..., None], axis=-1)[..., 0]
    entropy_RN = -jnp.sum(jnp.exp(logp_RNV) * logp_RNV, axis=-1)
    return logp_RN, entropy_RN


def _masked_mean(x_RN, mask_RN):
    return jnp.sum(x_RN * mask_RN) / jnp.maximum(jnp.sum(mask_RN), 1.0)


def rl_loss(params, expert_bias, batch, *, model_cfg, num_new, level, eps_low, eps_high, beta):
    logp_RN, entropy_RN = response_logprobs(params, expert_bias, batch, model_cfg=model_cfg, num_new=num_new)
    mask_RN = batch[MASK]
    pg_loss, stats = policy_loss(
        logp_RN,
        batch[OLD_LOGP],
        batch[ADVANTAGES],
        mask_RN,
        batch[UNIT_IDS],
        level=level,
        eps_low=eps_low,
        eps_high=eps_high,
    )
    # k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi; >= 0 per token.
    d_RN = batch[REF_LOGP] - logp_RN
    kl = _masked_mean(jnp.exp(d_RN) - d_RN - 1.0, mask_RN)
    loss = pg_loss + beta * kl
    stats = dict(stats, pg_loss=pg_loss, kl=kl, entropy=_masked_mean(jax.lax.stop_gradient(entropy_RN), mask_RN))
    return loss, stats


def rl_step(state: TrainState, batch, *, model_cfg, num_new, level, eps_low, eps_high, beta, optimizer):
    """One optimizer step on the RL loss; a non-finite step is skipped whole (`finite` False)."""
    loss_fn = functools.partial(
        rl_loss, model_cfg=model_cfg, num_new=num_new, level=level, eps_low=eps_low, eps_high=eps_high, beta=beta
    )
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.expert_bias, batch)
    grad_norm = optax.tree.norm(grads)

    def apply_update(operands):
        params, opt_state = operands
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    old = (state.params, state.opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(apply_update(old))
    params, opt_state = jax.lax.cond(finite, apply_update, lambda operands: operands, old)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    return new_state, dict(stats, loss=loss, grad_norm=grad_norm, finite=finite)


def batch_shardings(mesh, rules=LOGICAL_AXIS_RULES) -> dict[str, NamedSharding]:
    """Rows over the "activation_batch" mesh axes, for the [R, *] arrays and the [R] advantages."""
    rows_2d = NamedSharding(mesh, batch_spec(rules))
    rows_1d = NamedSharding(mesh, PartitionSpec(batch_spec(rules)[0]))
    keys_2d = (INPUTS, TARGETS, POSITIONS, SEGMENT_IDS, OLD_LOGP, REF_LOGP, MASK, UNIT_IDS)
    return {**{k: rows_2d for k in keys_2d}, ADVANTAGES: rows_1d}


def make_rl_step(model_cfg, rl, optimizer, mesh, state_shardings, num_new: int, rules=LOGICAL_AXIS_RULES):
    """The RL step jitted once: explicit in/out shardings, donated state. `rl` is an RLConfig."""
    eps_low, eps_high = rl.eps
    step = functools.partial(
        rl_step,
        model_cfg=model_cfg,
        num_new=num_new,
        level=rl.level,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=rl.beta,
        optimizer=optimizer,
    )
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings(mesh, rules)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    return run


def make_logprob_fn(model_cfg, mesh, params_shardings, bias_shardings, num_new: int, rules=LOGICAL_AXIS_RULES):
    """Jitted teacher-forced ([R, N] log-probs, [R, N] entropies) of a batch (reference policy, tests)."""
    shardings = batch_shardings(mesh, rules)
    keys = (INPUTS, TARGETS, POSITIONS, SEGMENT_IDS)
    jitted = jax.jit(
        functools.partial(response_logprobs, model_cfg=model_cfg, num_new=num_new),
        in_shardings=(params_shardings, bias_shardings, {k: shardings[k] for k in keys}),
        out_shardings=(shardings[OLD_LOGP], shardings[OLD_LOGP]),
    )

    def run(params, expert_bias, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(params, expert_bias, {k: batch[k] for k in keys})

    return run
