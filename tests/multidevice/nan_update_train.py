"""`ling-jax train ARGS` with an optimizer whose updates are NaN while loss and gradients stay finite
(as an invalid optimizer setting or an overflow in the moments would give): a test harness.

It appends `optax.scale(nan)` to the optimizer the training loop builds, so every update would turn
the weights into NaN. The guard in the train step must skip each such update, the run must stop
after train.max_nonfinite_steps with exit code 3, and no checkpoint may hold a NaN.

    python tests/multidevice/nan_update_train.py --workdir DIR --config.train.steps=20 ...
"""

from __future__ import annotations

import sys

import optax

import ling_jax.train.loop as loop_module
from ling_jax import cli


def main() -> None:
    original = loop_module.make_optimizer
    loop_module.make_optimizer = lambda train: optax.chain(original(train), optax.scale(float("nan")))
    cli.main(["ling-jax", "train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
