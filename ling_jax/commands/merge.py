"""`ling-jax merge --workdir DIR --window K --decay {mean,linear,cosine,1-sqrt} --out DIR2`.

WSM: averages the last K+1 checkpoints of a constant-LR run with the weights that emulate the
chosen LR decay (ling_jax/train/merge_weights.py), and writes a normal run directory (evaluate
it with `ling-jax eval --workdir DIR2`); `--hf_out` also exports it as a HF checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory with the checkpoints to merge", required=True)
_WINDOW = flags.DEFINE_integer("window", None, "merge window K: the last K+1 checkpoints are merged", required=True)
_DECAY = flags.DEFINE_enum("decay", "1-sqrt", ["mean", "linear", "cosine", "1-sqrt"], "decay curve to emulate")
_OUT = flags.DEFINE_string("out", None, "output run directory", required=True)
_HF_OUT = flags.DEFINE_string("hf_out", None, "also export the merged model as a HF checkpoint here")


def main(argv):
    del argv
    import jax

    from ling_jax.hf import save_checkpoint
    from ling_jax.train.merge_weights import merge_coefficients, merge_pytrees
    from ling_jax.train.run_dir import checkpointer_for, load_experiment, restore

    exp = load_experiment(_WORKDIR.value)
    steps = checkpointer_for(_WORKDIR.value, exp).all_steps()
    needed = _WINDOW.value + 1
    if _WINDOW.value < 1 or len(steps) < needed:
        raise SystemExit(
            f"ling-jax merge: --window {_WINDOW.value} needs {needed} checkpoints; "
            f"{_WORKDIR.value} has {len(steps)}: {steps}"
        )
    chosen = steps[-needed:]
    coefficients = merge_coefficients(_DECAY.value, _WINDOW.value)
    models, last = [], None
    for step in chosen:
        state, data_state, _, mesh, shardings = restore(_WORKDIR.value, exp, step)
        models.append({"params": state.params, "expert_bias": state.expert_bias})
        last = (state, data_state)
    merged = merge_pytrees(models, coefficients)
    state, data_state = last
    state = state.replace(params=merged["params"], expert_bias=merged["expert_bias"])

    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(_WORKDIR.value) / "config.json", out / "config.json")
    checkpointer = checkpointer_for(out, exp)
    checkpointer.save(chosen[-1], state, data_state)
    checkpointer.wait()
    checkpointer.close()
    if _HF_OUT.value:
        save_checkpoint(exp.model, jax.device_get(merged), _HF_OUT.value)
    print(f"merged steps {chosen} with {_DECAY.value} weights {[round(float(c), 4) for c in coefficients]} -> {out}")
    print(
        json.dumps(
            {"steps": chosen, "decay": _DECAY.value, "coefficients": [float(c) for c in coefficients], "out": str(out)}
        )
    )
