"""`ling-jax rl --init SFT_WORKDIR [--workdir DIR] [--config configs/tiny_rl.py] [--config.rl.objective=lpo|grpo|gspo]`.

Reinforcement learning from an SFT run on the embedded arithmetic task (ling_jax/rl/loop.py). With
no --config it uses the tiny_rl preset; `--init` fills `rl.init`. Prints the greedy held-out
accuracy of the init policy and of the final one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).resolve().parents[1] / "configs" / "tiny_rl.py"),
    "ml_collections RL config file; override fields with --config.section.key=value",
    lock_config=True,
)
_INIT = flags.DEFINE_string("init", None, "the SFT run directory (or Hugging Face checkpoint) RL starts from")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny_rl", "run directory: checkpoints, metrics.jsonl, TensorBoard")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "CPU only: devices to emulate in this process (0 = 1)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "resume a run whose stored config.json / rl.json differs in settings that change the numbers",
)


def main(argv):
    del argv
    from ling_jax.distributed import initialize

    initialize(None, None, None, _CPU_DEVICES.value)
    import dataclasses

    from ling_jax.rl.config import rl_from_config
    from ling_jax.rl.loop import run
    from ling_jax.train.loop import RunDirError, RunStopped, TrainingDiverged

    exp, rl = rl_from_config(_CONFIG.value)
    if _INIT.value:
        rl = dataclasses.replace(rl, init=_INIT.value)
    try:
        result = run(exp, rl, _WORKDIR.value, progress=_PROGRESS.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except TrainingDiverged as e:
        print(f"ling-jax rl: {e}", file=sys.stderr)
        sys.exit(3)
    except RunDirError as e:
        print(f"ling-jax rl: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        print(f"ling-jax rl: {e}", file=sys.stderr)
        sys.exit(4)
    first = "n/a (resumed run)" if result.heldout_first is None else f"{result.heldout_first:.3f}"
    print(
        f"\nRL ({rl.objective}) finished at iteration {result.final_iteration}: held-out accuracy "
        f"{first} (init) -> {result.heldout_last:.3f} (final)"
    )
    print(f"metrics: {_WORKDIR.value}/metrics.jsonl, reward curve: {_WORKDIR.value}/reward_curve.png")
