"""`ling-jax train ARGS` with NaN injected into chosen steps: a test harness, not a testing hook.

It wraps `ling_jax.train.step.train_step` (which `make_train_step` jits) so that on the steps in
POISONED (0-based optimizer step = state.step) the batch's loss_mask is NaN. The NaN then flows
through the real loss and gradients, exactly as a numerical blow-up would, and everything after
that (skipping the update, counting, stopping with exit code 3) is the real code.

    python tests/multidevice/poisoned_train.py --workdir DIR --config.train.steps=20 ...
"""

from __future__ import annotations

import sys

import jax.numpy as jnp

import ling_jax.train.step as step_module
from ling_jax import cli


def poisoned(step) -> jnp.ndarray:
    """Steps 3 and 4 (a short streak that recovers) and every step from 10 on."""
    return (step == 3) | (step == 4) | (step >= 10)


def main() -> None:
    original = step_module.train_step

    def train_step(state, batch, **kwargs):
        mask = jnp.where(poisoned(state.step), jnp.nan, batch["loss_mask"])
        return original(state, {**batch, "loss_mask": mask}, **kwargs)

    step_module.train_step = train_step
    cli.main(["ling-jax", "train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
