"""`ling-jax eval --workdir DIR [--step N]`: held-out next-token loss of a run's checkpoint."""

from __future__ import annotations

import json
import math

from absl import flags

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "run directory written by `ling-jax train` or `ling-jax merge`", required=True
)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_BATCHES = flags.DEFINE_integer("batches", 0, "max held-out batches (0 = the whole held-out split)")


def main(argv):
    del argv
    from jax.sharding import NamedSharding

    from ling_jax.sharding import batch_spec
    from ling_jax.train.loop import evaluate, experiment_datasets
    from ling_jax.train.run_dir import load_experiment, restore
    from ling_jax.train.step import make_eval_step

    exp = load_experiment(_WORKDIR.value)
    data = experiment_datasets(exp)
    if data.heldout is None:
        raise SystemExit(f"ling-jax eval: {_WORKDIR.value} was trained with data.heldout_fraction=0")
    state, _, step, mesh, shardings = restore(_WORKDIR.value, exp, _STEP.value)
    eval_step = make_eval_step(exp.model, mesh, shardings)
    loss = evaluate(
        exp, state.params, state.expert_bias, data.heldout, eval_step, NamedSharding(mesh, batch_spec()), _BATCHES.value
    )
    line, finite = result_json(_WORKDIR.value, step, loss)
    if finite:
        print(f"step {step}: held-out next-token loss {loss:.5f} nats/token")
    print(line)
    if not finite:
        raise SystemExit(f"ling-jax eval: the held-out loss of step {step} in {_WORKDIR.value} is {loss} (not finite)")


def result_json(workdir: str, step: int, loss: float) -> tuple[str, bool]:
    """The result line (strict JSON: a non-finite loss is null with an "error") and whether the loss is finite."""
    loss = float(loss)
    result = {"workdir": str(workdir), "step": int(step), "heldout_loss": loss}
    finite = math.isfinite(loss)
    if not finite:
        result.update(heldout_loss=None, error=f"held-out loss is not finite ({loss})")
    return json.dumps(result, allow_nan=False), finite
