"""`ling-jax train [--config configs/tiny.py] [--config.train.steps=N ...] [--workdir DIR]`.

With no flags it trains the tiny preset on the Python standard library's sources (found at run
time, no download) and ends by printing a generated sample.

`--init PREV_WORKDIR` starts a stage of the recipe from the previous stage's run (its newest
verified checkpoint; a Hugging Face checkpoint directory works too): parameters and expert biases
are carried over, the optimizer state and the step count start fresh (e.g. `configs/ling_1t_32k.py`
after `configs/ling_1t.py`). The model must be the previous stage's, except for the fields a
context-extension stage changes (STAGE_FIELDS: RoPE theta and scaling, max positions), which shape
no parameter. The weights are read by ling_jax/train/init_from.py (shared with `ling-jax sft
--init`). A run that resumes from its own checkpoint ignores `--init`.
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
_INIT = flags.DEFINE_string(
    "init",
    None,
    "start from the weights (params and expert biases; fresh optimizer and step) of a previous stage's run "
    "directory or a Hugging Face checkpoint directory",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "resume a run whose stored config.json differs in settings that change the numbers (recorded in "
    "WORKDIR/config_changes.jsonl); without it such a resume is refused",
)


# ModelConfig fields a context-extension stage changes (../shared/docs/ling2-spec.md: theta 10k -> 600k
# at 32K, YaRN at 128K); none of them shapes a parameter.
STAGE_FIELDS = ("rope_theta", "rope_scaling", "max_position_embeddings")


def source_model(path):
    """The ModelConfig of a run directory (its config.json) or of a Hugging Face checkpoint directory;
    None when `path` is neither (init_from says why)."""
    from pathlib import Path

    from ling_jax.hf.config import read_config
    from ling_jax.train.init_from import _is_run_dir
    from ling_jax.train.run_dir import load_experiment

    path = Path(path)
    if _is_run_dir(path):
        return load_experiment(path).model
    if (path / "config.json").is_file():
        try:
            return read_config(path)
        except (OSError, ValueError):  # init_from reads it again and names the problem
            return None
    return None


def load_stage_init(path, cfg):
    """{"params", "expert_bias"} of the previous stage at `path` for model `cfg` (ling_jax/train/init_from.py),
    allowing the STAGE_FIELDS to differ."""
    from ling_jax.train.init_from import load_init_variables

    source = source_model(path)
    if source is not None:  # compare everything else; these fields are this stage's own
        cfg = cfg.replace(**{f: getattr(source, f) for f in STAGE_FIELDS})
    return load_init_variables(path, cfg)


def main(argv):
    del argv
    from ling_jax.distributed import initialize

    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _CPU_DEVICES.value)
    from ling_jax.train.config import experiment_from_config
    from ling_jax.train.init_from import InitError
    from ling_jax.train.loop import RunDirError, RunStopped, TrainingDiverged, run

    exp = experiment_from_config(_CONFIG.value)
    try:
        init_variables = None if _INIT.value is None else load_stage_init(_INIT.value, exp.model)
        result = run(
            exp,
            _WORKDIR.value,
            progress=_PROGRESS.value,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
            init_variables=init_variables,
        )
    except InitError as e:
        print(f"ling-jax train: {e}", file=sys.stderr)
        sys.exit(2)
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
