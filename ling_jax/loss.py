"""Training losses: next-token CE, per-row multi-token-prediction CE, router z-loss.

Targets follow the packed-data convention: `targets[:, t]` is the token after `inputs[:, t]` and
`loss_mask[:, t]` is 1 where that transition is inside one document. MTP layer i at position t
predicts token t + i + 2 = targets[:, t + i + 1]; it is scored only where every transition from
t to t + i + 1 stays in one document (so no prediction ever crosses a row or a document).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ling_jax.model import LingOutput


def shift_left(x_BT: jax.Array, n: int, fill=0) -> jax.Array:
    """x[:, t + n] at position t; the last n positions get `fill`."""
    if n == 0:
        return x_BT
    pad = jnp.full((x_BT.shape[0], n), fill, x_BT.dtype)
    return jnp.concatenate([x_BT[:, n:], pad], axis=1)


def causal_lm_targets(input_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets, loss_mask) for an unpacked batch scored like HF labels == input_ids."""
    targets_BT = shift_left(input_ids_BT, 1)
    mask_BT = jnp.ones_like(input_ids_BT, jnp.float32).at[:, -1].set(0.0)
    return targets_BT, mask_BT


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT) -> tuple[jax.Array, jax.Array]:
    """(mean CE over masked positions, number of masked positions); float32 throughout."""
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    mask_BT = mask_BT.astype(jnp.float32)
    count = mask_BT.sum()
    return (ce_BT * mask_BT).sum() / jnp.maximum(count, 1.0), count


def mtp_targets(targets_BT, loss_mask_BT, layer: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask of MTP layer `layer` (0-based): token t + layer + 2."""
    mask_BT = loss_mask_BT.astype(jnp.float32)
    for j in range(1, layer + 2):
        mask_BT = mask_BT * shift_left(loss_mask_BT.astype(jnp.float32), j)
    return shift_left(targets_BT, layer + 1), mask_BT


def router_z_loss(out: LingOutput, token_mask_BT: jax.Array) -> jax.Array:
    """Mean over MoE layers (main and MTP) and tokens of logsumexp(router logits)^2."""
    logits = [s.logits_BTE for s in (out.router, out.mtp_router) if s is not None]
    if not logits:
        return jnp.float32(0.0)
    logits_LBTE = jnp.concatenate(logits)
    z_LBT = jnp.square(jax.nn.logsumexp(logits_LBTE.astype(jnp.float32), axis=-1))
    mask_BT = token_mask_BT.astype(jnp.float32)
    return (z_LBT * mask_BT).sum() / (jnp.maximum(mask_BT.sum(), 1.0) * logits_LBTE.shape[0])


def lm_loss(
    out: LingOutput, targets_BT, loss_mask_BT, *, mtp_weight: float, z_loss_weight: float = 0.0, token_mask_BT=None
):
    """Total loss = CE + mtp_weight * mean_i MTP_i CE (+ z_loss_weight * router z-loss), and parts."""
    main, count = masked_cross_entropy(out.logits, targets_BT, loss_mask_BT)
    metrics = {"ce_loss": main, "tokens": count}
    total = main
    if out.mtp_logits is not None and out.mtp_logits.shape[0]:
        mtp = []
        for i in range(out.mtp_logits.shape[0]):
            t_BT, m_BT = mtp_targets(targets_BT, loss_mask_BT, i)
            mtp.append(masked_cross_entropy(out.mtp_logits[i], t_BT, m_BT)[0])
        metrics["mtp_loss"] = jnp.mean(jnp.stack(mtp))
        total = total + mtp_weight * metrics["mtp_loss"]
    if z_loss_weight:
        mask = token_mask_BT if token_mask_BT is not None else jnp.ones_like(targets_BT, bool)
        metrics["z_loss"] = router_z_loss(out, mask)
        total = total + z_loss_weight * metrics["z_loss"]
    metrics["loss"] = total
    return total, metrics
