"""The clipped policy-gradient objectives of GRPO, LPO and GSPO as one function of their unit.

With units u of response i (its tokens where `mask` is 1, grouped by a unit id),
    r_u = exp(mean over t in u of (logp_t - old_logp_t))
    J   = (1 / sum_i |y_i|) * sum_i sum_u |u| * min(r_u A_i, clip(r_u, 1 - eps_low, 1 + eps_high) A_i)
and the loss is -J. The unit is what the importance ratio and its clip act on:

- "token": every token is its own unit (GRPO; DAPO's token-mean). Default eps 0.2 / 0.2, GRPO's
  symmetric range; DAPO's "clip-higher" 0.2 / 0.28 is `eps_high=0.28`.
- "sentence": LPO's linguistic units (sentences, from `ling_jax.rl.units.sentence_unit_ids`);
  default eps 0.03 / 0.03 (Ling 2.0 report).
- "sequence": one unit per response, the length-normalised ratio of GSPO in its token-mean form;
  default eps 3e-4 / 4e-4 (GSPO paper).

Everything is computed in float32 (float64 when the log-probs are float64, as in the gradient
test). Units are summed with a segment sum over (row, unit id), so a unit need
not be contiguous and the cost is O(B*T) whatever the number of units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = ("token", "sentence", "sequence")
DEFAULT_EPS = {"token": (0.2, 0.2), "sentence": (0.03, 0.03), "sequence": (3e-4, 4e-4)}


def default_eps(level: str) -> tuple[float, float]:
    """(eps_low, eps_high) used for `level` when none is given."""
    if level not in DEFAULT_EPS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return DEFAULT_EPS[level]


def level_unit_ids(level: str, mask_BT: jax.Array, unit_ids_BT: jax.Array | None) -> jax.Array:
    """The unit id of every token for `level`: the position (token), the given ids (sentence) or 0."""
    B, T = mask_BT.shape
    if level == "token":
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if level == "sequence":
        return jnp.zeros((B, T), jnp.int32)
    if unit_ids_BT is None:
        raise ValueError('level="sentence" needs unit_ids_BT (from ling_jax.rl.sentence_unit_ids)')
    if unit_ids_BT.shape != (B, T):
        raise ValueError(f"unit_ids_BT has shape {unit_ids_BT.shape}, mask_BT {mask_BT.shape}: they must match")
    return unit_ids_BT.astype(jnp.int32)


def policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    advantages_B: jax.Array,
    mask_BT: jax.Array,
    unit_ids_BT: jax.Array | None,
    *,
    level: str,
    eps_low: float | None = None,
    eps_high: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(-J, stats) for the clipped objective above (float32 scalar loss).

    logp_BT: the current policy's log-probs of the response tokens; old_logp_BT: the sampling
    policy's (no gradient flows into them); advantages_B: one advantage per response; mask_BT: 1 on
    response tokens, 0 on padding; unit_ids_BT: int unit ids in [0, T) per token (read only for
    level="sentence"; "token" and "sequence" define their own units and accept None).

    stats: clip_fraction (the share of response tokens whose unit's ratio is clipped on its
    advantage's side, i.e. gets no gradient), ratio_mean (token-weighted mean of r_u), tokens.
    """
    low_default, high_default = default_eps(level)
    eps_low = low_default if eps_low is None else eps_low
    eps_high = high_default if eps_high is None else eps_high
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"eps_low must be in [0, 1) and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    B, T = mask_BT.shape
    for name, x, shape in (
        ("logp_BT", logp_BT, (B, T)),
        ("old_logp_BT", old_logp_BT, (B, T)),
        ("advantages_B", advantages_B, (B,)),
    ):
        if x.shape != shape:
            raise ValueError(f"{name} has shape {x.shape}; expected {shape} (mask_BT is {mask_BT.shape})")
    units_BT = level_unit_ids(level, mask_BT, unit_ids_BT)

    f32 = jnp.promote_types(jnp.float32, logp_BT.dtype)  # at least float32, even for bfloat16 log-probs
    mask_BT = mask_BT.astype(f32)
    delta_BT = (logp_BT.astype(f32) - jax.lax.stop_gradient(old_logp_BT).astype(f32)) * mask_BT
    # One segment per (row, unit): ids b * T + u (u < T).
    seg_BT = jnp.arange(B, dtype=jnp.int32)[:, None] * T + jnp.clip(units_BT, 0, T - 1)
    seg = seg_BT.reshape(-1)
    size_S = jax.ops.segment_sum(mask_BT.reshape(-1), seg, num_segments=B * T)
    delta_S = jax.ops.segment_sum(delta_BT.reshape(-1), seg, num_segments=B * T)
    ratio_S = jnp.exp(delta_S / jnp.maximum(size_S, 1.0))
    adv_S = jnp.repeat(advantages_B.astype(f32), T)
    unclipped_S = ratio_S * adv_S
    clipped_S = jnp.clip(ratio_S, 1.0 - eps_low, 1.0 + eps_high) * adv_S
    objective_S = jnp.minimum(unclipped_S, clipped_S)
    total = jnp.maximum(jnp.sum(mask_BT), 1.0)
    J = jnp.sum(size_S * objective_S) / total
    # Clipped on the advantage's side: the min picks the constant clipped term (zero gradient).
    is_clipped_S = ((adv_S > 0) & (ratio_S > 1.0 + eps_high)) | ((adv_S < 0) & (ratio_S < 1.0 - eps_low))
    stats = {
        "clip_fraction": jnp.sum(size_S * is_clipped_S) / total,
        "ratio_mean": jnp.sum(size_S * ratio_S) / total,
        "tokens": jnp.sum(mask_BT),
    }
    return -J, stats
