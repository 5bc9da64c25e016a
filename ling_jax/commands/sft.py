"""`ling-jax sft [--config configs/tiny_sft.py] [--init WORKDIR_or_HF_DIR] [--workdir DIR]`.

Supervised fine-tuning on chat data (the embedded arithmetic task by default, or a JSONL file of
{"messages": [...]} via --config.data.source), the loss on the assistant's tokens only; then the
held-out accuracy of think-on and think-off prompts (ling_jax/posttrain/sft.py). With no flags: the
tiny SFT preset from scratch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_sft.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "SFT config file (an experiment plus an `sft` section)", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny_sft", "run directory: checkpoints, metrics.jsonl, TensorBoard")
_INIT = flags.DEFINE_string("init", None, "start from this run directory's newest good checkpoint or HF checkpoint")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "CPU only: devices to emulate in this process (0 = 1)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "resume a run whose stored settings differ (recorded in config_changes.jsonl)"
)


def main(argv):
    del argv
    from ling_jax.distributed import initialize

    initialize(None, None, None, _CPU_DEVICES.value)
    from ling_jax.posttrain.sft import run_sft
    from ling_jax.train.init_from import InitError
    from ling_jax.train.loop import RunDirError, RunStopped, TrainingDiverged

    try:
        result = run_sft(
            _CONFIG.value,
            _WORKDIR.value,
            init=_INIT.value,
            progress=_PROGRESS.value,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
        )
    except TrainingDiverged as e:
        print(f"ling-jax sft: {e}", file=sys.stderr)
        sys.exit(3)
    except (RunDirError, InitError) as e:  # nothing was written
        print(f"ling-jax sft: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        print(f"ling-jax sft: {e}", file=sys.stderr)
        sys.exit(4)
    run = result.run
    print(f"\nfinal step {run.final_step}: train loss {run.final_loss:.4f} nats per assistant token")
    if run.heldout_loss is not None:
        print(f"held-out loss on assistant tokens {run.heldout_loss:.4f}")
    acc = result.accuracy
    if acc:
        print(
            f"held-out accuracy (greedy): think-on {acc['heldout_accuracy_think_on']:.1%} "
            f"(mean {acc['mean_response_length_think_on']:.1f} tokens), think-off "
            f"{acc['heldout_accuracy_think_off']:.1%} (mean {acc['mean_response_length_think_off']:.1f} tokens)"
        )
    print(f"metrics: {_WORKDIR.value}/metrics.jsonl, loss curve: {_WORKDIR.value}/loss_curve.png")
