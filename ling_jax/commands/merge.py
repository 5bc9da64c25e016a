"""`ling-jax merge --workdir DIR --window K --decay {mean,linear,cosine,1-sqrt} --out DIR2`.

WSM: averages the last K+1 checkpoints of a constant-LR run with the weights that emulate the
chosen LR decay (ling_jax/train/merge_weights.py), and writes a new run directory (evaluate it with
`ling-jax eval --workdir DIR2`); `--hf_out` also exports it as a HF checkpoint.

Nothing the user has is touched: `--out` must be a new or empty directory (another run's directory
would get a checkpoint beside its own and a new config.json, and a later step there makes Orbax
skip the save), `--hf_out` must be new, empty or a HF checkpoint, and both are checked before any
work. A merge that fails removes what it wrote and nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory with the checkpoints to merge", required=True)
_WINDOW = flags.DEFINE_integer(
    "window", None, "merge window K >= 1: the last K+1 checkpoints are merged", required=True
)
_DECAY = flags.DEFINE_enum("decay", "1-sqrt", ["mean", "linear", "cosine", "1-sqrt"], "decay curve to emulate")
_OUT = flags.DEFINE_string("out", None, "output run directory (new or empty)", required=True)
_HF_OUT = flags.DEFINE_string("hf_out", None, "also export the merged model as a HF checkpoint here (new or empty)")


def _fail(message: str):
    raise SystemExit(f"ling-jax merge: {message}")


def _check_destinations(workdir: Path, out: Path, hf_out: Path | None) -> None:
    """Refuses, before any work, every destination a merge could harm."""
    from ling_jax.hf import CheckpointError, check_save_target

    source = workdir.resolve()
    if out.resolve() == source:
        _fail(f"--out {out} is the --workdir; merge writes a new run directory, choose another --out")
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        _fail(
            f"--out {out} is not empty ({shown}); merge writes only into a new or empty directory, "
            "so it never adds to or overwrites another run"
        )
    if hf_out is not None:
        for flag, other in (("--workdir", source), ("--out", out.resolve())):
            if hf_out.resolve() == other:
                _fail(f"--hf_out {hf_out} is the {flag}; choose a directory of its own")
        if out.resolve().is_relative_to(hf_out.resolve()):
            _fail(f"--out {out} lies inside --hf_out {hf_out}, which a HF checkpoint save replaces as a whole")
        try:
            check_save_target(hf_out)
        except CheckpointError as e:
            _fail(f"--hf_out: {e}")


def _remove_written(out: Path, created: bool) -> None:
    """Undoes a failed merge's writes into `out` (which was new or empty): only what it wrote."""
    (out / "config.json").unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def main(argv):
    del argv
    window = _WINDOW.value
    if window < 1:
        _fail(f"--window must be at least 1 (the last K+1 checkpoints are merged), got {window}")
    workdir, out = Path(_WORKDIR.value), Path(_OUT.value)
    hf_out = Path(_HF_OUT.value) if _HF_OUT.value else None
    _check_destinations(workdir, out, hf_out)

    import jax

    from ling_jax.hf import CheckpointError, save_checkpoint
    from ling_jax.train.merge_weights import merge_coefficients, merge_pytrees
    from ling_jax.train.run_dir import checkpointer_for, load_experiment, restore

    exp = load_experiment(workdir)
    steps = checkpointer_for(workdir, exp).all_steps()
    needed = window + 1
    if len(steps) < needed:
        _fail(f"--window {window} needs {needed} checkpoints; {workdir} has {len(steps)}: {steps}")
    chosen = steps[-needed:]
    coefficients = merge_coefficients(_DECAY.value, window)
    models, last = [], None
    for step in chosen:
        state, data_state, _, mesh, shardings = restore(workdir, exp, step)
        models.append({"params": state.params, "expert_bias": state.expert_bias})
        last = (state, data_state)
    merged = merge_pytrees(models, coefficients)
    state, data_state = last
    state = state.replace(params=merged["params"], expert_bias=merged["expert_bias"])

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copy(workdir / "config.json", out / "config.json")
        checkpointer = checkpointer_for(out, exp)
        checkpointer.save(chosen[-1], state, data_state)
        checkpointer.wait()
        written = checkpointer.all_steps()
        checkpointer.close()
        if written != [chosen[-1]]:
            _fail(f"the merged checkpoint (step {chosen[-1]}) was not written to {out}; it holds steps {written}")
        if hf_out is not None:
            try:
                save_checkpoint(exp.model, jax.device_get(merged), hf_out)
            except (CheckpointError, OSError) as e:
                _fail(f"--hf_out {hf_out}: {e} (nothing was written; {out} removed)")
    except BaseException:
        _remove_written(out, created)
        raise
    print(f"merged steps {chosen} with {_DECAY.value} weights {[round(float(c), 4) for c in coefficients]} -> {out}")
    print(
        json.dumps(
            {"steps": chosen, "decay": _DECAY.value, "coefficients": [float(c) for c in coefficients], "out": str(out)}
        )
    )
