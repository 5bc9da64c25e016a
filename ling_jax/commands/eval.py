"""`ling-jax eval --workdir DIR [--step N]`: held-out next-token loss of a run's checkpoint.

`--task passkey --length N [--depths 0,0.5,1] [--samples S] [--seed K]`: passkey retrieval
(ling_jax/tasks/passkey.py) with samples of N tokens, the key hidden at each depth (a fraction of
the context), scored exactly by teacher forcing (equal to greedy decoding of the key). Prints the
accuracy at each depth and overall, then one JSON line.
"""

from __future__ import annotations

import json
import math
import sys

from absl import flags

from ling_jax.tasks.passkey import DEFAULT_DEPTHS

TASKS = ("heldout", "passkey")

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "run directory written by `ling-jax train` or `ling-jax merge`", required=True
)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_TASK = flags.DEFINE_enum("task", "heldout", TASKS, "heldout: next-token loss; passkey: passkey retrieval")
_BATCHES = flags.DEFINE_integer("batches", 0, "heldout: max held-out batches (0 = the whole held-out split)")
_LENGTH = flags.DEFINE_integer("length", None, "passkey: tokens per sample (prompt and answer)")
_DEPTHS = flags.DEFINE_list(
    "depths", [str(d) for d in DEFAULT_DEPTHS], "passkey: depths of the key, fractions of the context in [0, 1]"
)
_SAMPLES = flags.DEFINE_integer("samples", 10, "passkey: samples per depth", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "passkey: seed of the samples (keys and filler phase)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "passkey: samples per forward pass", lower_bound=1)


def _parse_depths(values: list[str]) -> list[float]:
    depths = []
    for v in values:
        try:
            depth = float(v)
        except ValueError:
            raise flags.ValidationError(f"--depths: {v!r} is not a number") from None
        if not 0.0 <= depth <= 1.0:
            raise flags.ValidationError(f"--depths: {depth} is outside [0, 1] (a fraction of the context)")
        depths.append(depth)
    if not depths:
        raise flags.ValidationError("--depths: give at least one depth")
    return depths


flags.register_validator("depths", lambda v: _parse_depths(v) is not None)


def _usage_error(message: str):
    """Exits 2 with one line: a flag that cannot work with this run (nothing has been evaluated)."""
    from ling_jax.cli import USAGE_EXIT

    print(f"ling-jax eval: bad flag: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def main(argv):
    del argv
    if _TASK.value == "passkey":
        return main_passkey()
    if _LENGTH.value is not None:
        _usage_error(f"--length is for --task passkey (this is --task {_TASK.value})")
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


def main_passkey():
    import jax
    from jax.experimental import multihost_utils

    from ling_jax.data.tokenizer import load_tokenizer
    from ling_jax.tasks import passkey
    from ling_jax.train.run_dir import load_experiment, restore

    length, depths = _LENGTH.value, _parse_depths(_DEPTHS.value)
    if length is None:
        _usage_error("--task passkey needs --length N (tokens per sample)")
    exp = load_experiment(_WORKDIR.value)
    tokenizer = load_tokenizer(exp.data.tokenizer)
    shortest = passkey.min_length(tokenizer)
    if length < shortest:
        _usage_error(f"--length {length} is shorter than the passkey needle, question and answer ({shortest} tokens)")
    if length - 1 > exp.model.max_position_embeddings:
        _usage_error(
            f"--length {length} needs {length - 1} input positions; the model has "
            f"model.max_position_embeddings={exp.model.max_position_embeddings}"
        )
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise ValueError(
            f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds model.vocab_size ({exp.model.vocab_size})"
        )
    samples = passkey.eval_samples(tokenizer, length, depths, _SAMPLES.value, _SEED.value)
    state, _, step, _, _ = restore(_WORKDIR.value, exp, _STEP.value)
    variables = {"params": state.params, "expert_bias": state.expert_bias}
    if jax.process_count() > 1:  # parameters span processes: a full copy on each host
        variables = multihost_utils.process_allgather(variables, tiled=True)
    variables = jax.device_get(variables)
    accuracy = passkey.accuracy(exp.model, variables, samples, _BATCH_SIZE.value)
    print(f"step {step}: passkey retrieval at {length} tokens, {_SAMPLES.value} samples per depth (seed {_SEED.value})")
    for line in passkey_lines(accuracy, _SAMPLES.value):
        print(line)
    print(passkey_json(_WORKDIR.value, step, length, _SAMPLES.value, _SEED.value, accuracy))


def passkey_lines(accuracy: dict[float, float], samples: int) -> list[str]:
    """The human-readable table: one line per depth, then overall (the mean over depths)."""
    lines = [f"depth {d:.2f}: {round(a * samples)}/{samples} retrieved ({a:.3f})" for d, a in accuracy.items()]
    lines.append(f"overall: {sum(accuracy.values()) / len(accuracy):.3f}")
    return lines


def passkey_json(workdir: str, step: int, length: int, samples: int, seed: int, accuracy: dict[float, float]) -> str:
    """The result line: accuracy per depth (keys are the depths as written by `str(float)`) and overall."""
    result = {
        "workdir": str(workdir),
        "step": int(step),
        "task": "passkey",
        "length": int(length),
        "samples": int(samples),
        "seed": int(seed),
        "accuracy": {str(float(d)): float(a) for d, a in accuracy.items()},
        "overall": float(sum(accuracy.values()) / len(accuracy)),
    }
    return json.dumps(result, allow_nan=False)


def result_json(workdir: str, step: int, loss: float) -> tuple[str, bool]:
    """The result line (strict JSON: a non-finite loss is null with an "error") and whether the loss is finite."""
    loss = float(loss)
    result = {"workdir": str(workdir), "step": int(step), "heldout_loss": loss}
    finite = math.isfinite(loss)
    if not finite:
        result.update(heldout_loss=None, error=f"held-out loss is not finite ({loss})")
    return json.dumps(result, allow_nan=False), finite
