"""`ling-jax train [--config configs/tiny.py] [--config.train.steps=N ...] [--workdir DIR]`.

With no flags it trains the tiny preset on the Python standard library's sources (found at run
time, no download) and ends by printing a generated sample.
"""

from __future__ import annotations

import sys

from absl import flags

from ling_jax.commands.flags import define_config_flag

_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "run directory: checkpoints, metrics.jsonl, TensorBoard")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "CPU only: devices to emulate in this process (0 = 1)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "resume a run whose stored config.json differs in settings that change the numbers (recorded in "
    "WORKDIR/config_changes.jsonl); without it such a resume is refused",
)


def main(argv):
    del argv
    from ling_jax.distributed import initialize

    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _CPU_DEVICES.value)
    from ling_jax.train.config import experiment_from_config
    from ling_jax.train.loop import RunDirError, RunStopped, TrainingDiverged, run

    exp = experiment_from_config(_CONFIG.value)
    try:
        result = run(exp, _WORKDIR.value, progress=_PROGRESS.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except TrainingDiverged as e:
        print(f"ling-jax train: {e}", file=sys.stderr)
        sys.exit(3)
    except RunDirError as e:  # nothing was written
        print(f"ling-jax train: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        print(f"ling-jax train: {e}", file=sys.stderr)
        sys.exit(4)
    print(
        f"\nfinal step {result.final_step}: train loss {result.final_loss:.4f} nats/token "
        f"(unigram entropy of the corpus {result.unigram_entropy:.4f})"
    )
    if result.heldout_loss is not None:
        print(f"held-out next-token loss {result.heldout_loss:.4f}")
    print(f"metrics: {_WORKDIR.value}/metrics.jsonl, loss curve: {_WORKDIR.value}/loss_curve.png")
    if result.sample:
        print("\n--- sample ---")
        print(result.sample)
