"""Learning-rate schedules: WSM (warmup then constant, Ling 2.0) and WSD baselines, as optax schedules.

WSM (warmup-stable-merge, arXiv 2507.17634) never decays the LR during training; the annealing is
done afterwards by merging checkpoints (`ling_jax.train.merge_weights`). Ling 2.0 warms up linearly
for 2,000 steps to the peak LR and then holds it until training ends.

WSD (warmup-stable-decay) is the baseline WSM is compared against: the same warmup and plateau,
then a decay over the last `decay_steps` steps. The decay shapes (`decay_shape`) are shared with
the merge weights, so a WSM merge and a WSD run can emulate the same curve.

Steps count optimizer updates from 0; the schedules are jit-compatible functions of the step.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

DECAY_KINDS = ("linear", "cosine", "1-sqrt")


def decay_shape(kind: str, progress, xp=jnp):
    """Fraction of the pre-decay LR left after `progress` in [0, 1] of a decay that ends at 0.

        linear: 1 - x      cosine: (1 + cos(pi x)) / 2      1-sqrt: 1 - sqrt(x)

    `xp` is the array module (jax.numpy inside schedules, numpy for merge weights).
    """
    x = xp.clip(progress, 0.0, 1.0)
    if kind == "linear":
        return 1.0 - x
    if kind == "cosine":
        return 0.5 * (1.0 + xp.cos(np.pi * x))
    if kind == "1-sqrt":
        return 1.0 - xp.sqrt(x)
    raise ValueError(f"decay kind must be one of {DECAY_KINDS}, got {kind!r}")


def _check_lr(name: str, value: float, *, allow_zero: bool) -> float:
    value = float(value)
    ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def _check_steps(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _warmup(init_lr: float, peak_lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear from init_lr at step 0 to peak_lr at step warmup_steps, peak_lr after."""
    if warmup_steps == 0:
        return optax.constant_schedule(peak_lr)
    return optax.join_schedules(
        [optax.linear_schedule(init_lr, peak_lr, warmup_steps), optax.constant_schedule(peak_lr)],
        boundaries=[warmup_steps],
    )


def wsm_schedule(peak_lr: float, warmup_steps: int, init_lr: float = 0.0) -> optax.Schedule:
    """WSM: lr(t) = init_lr + (peak_lr - init_lr) * t / warmup_steps for t < warmup_steps, else peak_lr."""
    peak_lr = _check_lr("peak_lr", peak_lr, allow_zero=False)
    init_lr = _check_lr("init_lr", init_lr, allow_zero=True)
    warmup_steps = _check_steps("warmup_steps", warmup_steps)
    return _warmup(init_lr, peak_lr, warmup_steps)


def wsd_schedule(
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_steps: int,
    decay: str = "linear",
    *,
    init_lr: float = 0.0,
    final_lr: float = 0.0,
) -> optax.Schedule:
    """WSD: the WSM warmup and plateau, then a decay over steps [total - decay_steps, total].

    With s = total_steps - decay_steps (decay start) and x = (t - s) / decay_steps:
    lr(t) = final_lr + (peak_lr - final_lr) * decay_shape(decay, x) for s <= t, so lr(s) = peak_lr
    and lr(t) = final_lr for t >= total_steps.
    """
    peak_lr = _check_lr("peak_lr", peak_lr, allow_zero=False)
    init_lr = _check_lr("init_lr", init_lr, allow_zero=True)
    final_lr = _check_lr("final_lr", final_lr, allow_zero=True)
    if final_lr > peak_lr:
        raise ValueError(f"final_lr ({final_lr}) must not exceed peak_lr ({peak_lr})")
    warmup_steps = _check_steps("warmup_steps", warmup_steps)
    total_steps = _check_steps("total_steps", total_steps)
    decay_steps = _check_steps("decay_steps", decay_steps)
    if decay not in DECAY_KINDS:
        raise ValueError(f"decay must be one of {DECAY_KINDS}, got {decay!r}")
    if decay_steps == 0 or warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"decay_steps must be in [1, total_steps - warmup_steps] = [1, {total_steps - warmup_steps}], "
            f"got {decay_steps}"
        )
    decay_start = total_steps - decay_steps

    def decay_phase(step):  # join_schedules passes step - decay_start
        return final_lr + (peak_lr - final_lr) * decay_shape(decay, step / decay_steps)

    return optax.join_schedules([_warmup(init_lr, peak_lr, warmup_steps), decay_phase], [decay_start])
