"""The training run: data, mesh, sharded state, the compiled step, checkpoints, logs, a sample.

`run(experiment, workdir)` resumes from the newest checkpoint in `workdir` that restores and
verifies (a damaged one is moved to WORKDIR/quarantine with a warning), and continues with exactly
the losses an uninterrupted run would have produced. The directory's rules (a lock, no foreign
files, no silent change of settings) are in run_dir.py; a run that cannot go on stops with one line
(RunStopped, RunDirError, ConfigError).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm import tqdm

from ling_jax.config import ConfigError
from ling_jax.data import batch as batch_keys
from ling_jax.data import build_datasets, check_token_ids, make_eval_batches, make_train_iterator
from ling_jax.decoding.generate import generate
from ling_jax.sharding import batch_spec, build_mesh
from ling_jax.sharding.rules import mesh_axes
from ling_jax.train import run_dir
from ling_jax.train.checkpointing import Checkpointer, CheckpointError, CorruptCheckpoint
from ling_jax.train.config import Experiment
from ling_jax.train.flops import measure_matmul_peak, model_flops_per_token
from ling_jax.train.metrics_log import MetricsLog, plot_loss_curve, read_metrics
from ling_jax.train.ramp import BatchSchedule
from ling_jax.train.run_dir import RunDirError, experiment_to_dict  # noqa: F401  (re-exported)
from ling_jax.train.state import create_sharded_state, make_optimizer, state_shardings
from ling_jax.train.step import make_eval_step, make_train_step


class RunStopped(RuntimeError):
    """The run cannot go on (a failed save, a full disk, no usable checkpoint); one line for the user."""


class TrainingDiverged(RunStopped):
    """Too many consecutive non-finite steps; the message names the newest checkpoint (all are finite)."""


@dataclasses.dataclass
class RunResult:
    final_step: int
    final_loss: float
    heldout_loss: float | None
    unigram_entropy: float
    sample: str
    records: list[dict]


def experiment_datasets(exp: Experiment):
    """The tokenizer, train and held-out data of `exp` (the same split for train, eval and tests)."""
    return build_datasets(
        exp.data.source,
        exp.data.tokenizer,
        exp.train.seq_len,
        exp.data.heldout_fraction,
        exp.train.seed,
        exp.data.max_tokens or None,
        passkey_fraction=exp.data.passkey_fraction,
    )


def check_batch_layout(exp: Experiment, mesh) -> None:
    """Fails before compilation when the global batch cannot be split as the mesh asks."""
    shards = math.prod(mesh.shape[a] for a in mesh_axes("activation_batch", mesh.axis_names))
    if exp.train.batch_size % shards:
        raise ConfigError(
            f"train.batch_size={exp.train.batch_size} is not divisible by the batch-parallel devices "
            f"mesh.data x mesh.fsdp x mesh.expert = {shards}"
        )
    rows = exp.train.microbatch_size
    if exp.train.microbatches > 1 and rows % shards:
        raise ConfigError(
            "train.microbatches",
            f"({exp.train.microbatches}) cuts train.batch_size={exp.train.batch_size} into microbatches of "
            f"{rows} rows, not divisible by the batch-parallel devices mesh.data x mesh.fsdp x mesh.expert = {shards}",
        )
    if exp.train.batch_ramp.enabled and rows % jax.process_count():  # the ramp's iterator yields microbatches
        raise ConfigError(
            "train.microbatches",
            f"microbatches of {rows} rows (train.batch_ramp is on) are not divisible by the "
            f"{jax.process_count()} processes",
        )
    if exp.train.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={exp.train.batch_size} is not divisible by the {jax.process_count()} processes"
        )


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the corpus's token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens, np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def fp8_records(stats) -> dict[str, float]:
    """Flattens sown FP8 statistics to `fp8/<module path>/<stat>[/layer_i]` metric names."""
    if not stats:
        return {}
    records = {}
    for path, value in flax.traverse_util.flatten_dict(stats).items():
        name = "fp8/" + "/".join(path)
        value = np.atleast_1d(np.asarray(value))
        if value.size == 1:
            records[name] = float(value[0])
        else:
            records.update({f"{name}/layer_{i}": float(v) for i, v in enumerate(value)})
    return records


def _global_batch(local: dict, sharding: NamedSharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def evaluate(exp: Experiment, params, expert_bias, rows, eval_step, sharding, max_batches: int) -> float:
    total, tokens = 0.0, 0.0
    for i, batch in enumerate(make_eval_batches(rows, exp.train.microbatch_size)):  # the train step's row count
        if max_batches and i >= max_batches:
            break
        out = eval_step(params, expert_bias, _global_batch(batch, sharding))
        total += float(out["ce_sum"])
        tokens += float(out["tokens"])
    return total / max(tokens, 1.0)


def run(
    exp: Experiment,
    workdir: str | Path,
    *,
    progress: bool = True,
    allow_config_change: bool = False,
    datasets=None,
    init_variables=None,
    on_start=None,
) -> RunResult:
    """Trains `exp` in `workdir`, resuming from its newest usable checkpoint. Raises RunDirError
    (the directory cannot be used; nothing written), RunStopped, or ConfigError, each one line.

    For other stages than pre-training (ling_jax/posttrain): `datasets` replaces
    `experiment_datasets(exp)` (an object with `train`, `heldout` and `tokenizer`, the rows having
    `batch(indices)`, `seq_len`, `pad_id`, `tokens_L` and a length, like PackedRows); a fresh run
    (no checkpoint to resume) starts from `init_variables` ({"params", "expert_bias"}, e.g. from
    ling_jax.train.init_from) instead of a random init; `on_start(stored_config)` is called on the
    main process once the directory is checked, locked and its config.json written (None for a
    fresh directory), before training."""
    workdir = Path(workdir)
    prepared = run_dir.prepare(workdir, exp, allow_change=allow_config_change, process_index=jax.process_index())
    try:
        return _run(
            exp,
            workdir,
            prepared,
            progress=progress,
            allow_config_change=allow_config_change,
            datasets=datasets,
            init_variables=init_variables,
            on_start=on_start,
        )
    finally:
        prepared.lock.release()


def _warn(message: str) -> None:
    print(f"ling-jax train: warning: {message}", file=sys.stderr, flush=True)


def restore_newest_good(checkpointer: Checkpointer, abstract, shardings):
    """(step, state, data state) of the newest checkpoint that restores and verifies, or None when
    there is none at all. Each unusable one is moved to the quarantine folder with a warning; when
    every one is unusable, RunStopped."""
    bad = []
    for step in reversed(checkpointer.all_steps()):
        try:
            state, data_state = checkpointer.restore(step, abstract, shardings)
        except CorruptCheckpoint as e:
            moved = checkpointer.quarantine(step)
            _warn(f"{e}; moved it to {moved} and trying the previous checkpoint")
            bad.append(str(moved))
            continue
        return step, state, data_state
    if bad:
        raise RunStopped(
            f"no usable checkpoint in {checkpointer.directory}: every one failed verification (moved to "
            f"{', '.join(bad)}); run again to start from scratch, or restore a good copy"
        )
    return None


def _place_like(tree, like, name: str):
    """`tree`'s leaves put on `like`'s shardings in `like`'s dtypes; ValueError naming the first
    leaf whose path or shape differs."""
    got = dict(jax.tree_util.tree_leaves_with_path(tree))
    want = dict(jax.tree_util.tree_leaves_with_path(like))
    for path in sorted(got.keys() | want.keys(), key=jax.tree_util.keystr):
        if path not in got or path not in want or np.shape(got[path]) != want[path].shape:
            shapes = [np.shape(t[path]) if path in t else "absent" for t in (got, want)]
            raise ValueError(
                f"init {name}{jax.tree_util.keystr(path)}: shape {shapes[0]} does not fit the model's {shapes[1]}"
            )
    return jax.tree.map(lambda x, y: jax.device_put(np.asarray(x, y.dtype), y.sharding), tree, like)


def _newest_checkpoint_line(checkpointer: Checkpointer) -> str:
    steps = checkpointer.all_steps()
    if not steps:
        return f"No checkpoint was saved in {checkpointer.directory}."
    return f"The newest checkpoint, {checkpointer.path(steps[-1])}, holds finite values (every saved one does)."


def _run(
    exp: Experiment,
    workdir: Path,
    prepared,
    *,
    progress: bool,
    allow_config_change: bool,
    datasets=None,
    init_variables=None,
    on_start=None,
) -> RunResult:
    is_main = jax.process_index() == 0
    mesh = build_mesh(exp.mesh.axes)
    check_batch_layout(exp, mesh)
    checkpointer = Checkpointer(
        workdir / run_dir.CHECKPOINTS, keep=exp.checkpoint.keep, async_save=exp.checkpoint.async_save
    )
    listed = checkpointer.latest_step()
    if listed is not None and listed > exp.train.steps:
        checkpointer.close()
        raise ConfigError(
            "train.steps",
            f"is {exp.train.steps}, below the step of the newest checkpoint in {checkpointer.directory} "
            f"({listed}): nothing would be trained; set train.steps >= {listed} or use another --workdir",
        )
    data = experiment_datasets(exp) if datasets is None else datasets
    if data.tokenizer.vocab_size > exp.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={exp.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({data.tokenizer.vocab_size}, data.tokenizer={exp.data.tokenizer!r})"
        )
    entropy = unigram_entropy(data.train.tokens_L)

    optimizer = make_optimizer(exp.train)
    abstract, shardings = state_shardings(exp.model, optimizer, mesh)
    schedule = BatchSchedule(exp.train)
    # Under a batch ramp the iterator yields microbatches and a step draws as many as the schedule says.
    ramp = exp.train.batch_ramp.enabled
    iterator = make_train_iterator(
        data.train, global_batch_size=exp.train.microbatch_size if ramp else exp.train.batch_size, seed=exp.train.seed
    )
    if prepared.changes and listed is not None:  # before any restore: a mismatch is no corruption
        run_dir.check_same_state_layout(prepared.stored, abstract)
    restored = restore_newest_good(checkpointer, abstract, shardings)
    if is_main:  # only now, when every check has passed
        run_dir.write_config(
            workdir, exp, prepared.changes, allowed_by_flag=allow_config_change, step=restored[0] if restored else None
        )
        if on_start is not None:
            on_start(prepared.stored)
    if restored is not None:
        latest, state, data_state = restored
        iterator.set_state(data_state)
        print(f"resumed from {checkpointer.directory}/{latest}")
    else:
        state, _ = create_sharded_state(exp.model, optimizer, mesh, exp.train.seed)
        if init_variables is not None:  # a later stage: start from these weights, fresh optimizer
            state = state.replace(
                params=_place_like(init_variables["params"], state.params, "params"),
                expert_bias=_place_like(init_variables.get("expert_bias", {}), state.expert_bias, "expert_bias"),
            )
    train_step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
    eval_step = make_eval_step(exp.model, mesh, shardings)
    batch_sharding = NamedSharding(mesh, batch_spec())

    flops_per_token = model_flops_per_token(exp.model, exp.train.seq_len)
    peak = exp.train.peak_flops_per_device or measure_matmul_peak(exp.model.jnp_dtype)
    log = MetricsLog(workdir, enabled=is_main)
    start_step = int(state.step)
    bar = tqdm(
        total=exp.train.steps, initial=start_step, disable=not (progress and is_main), unit="step", dynamic_ncols=True
    )
    window_start, window_tokens = time.perf_counter(), 0
    step = start_step
    completed = False
    try:
        while step < exp.train.steps:
            if ramp:
                parts = [next(iterator) for _ in range(schedule.microbatches(step))]
                local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            else:
                local = next(iterator)
            batch_size = schedule.batch_size(step)
            check_token_ids(local[batch_keys.INPUTS], exp.model.vocab_size, what=f"train batch {step} inputs")
            state, metrics = train_step(state, _global_batch(local, batch_sharding))
            step += 1
            window_tokens += batch_size * exp.train.seq_len
            streak = int(state.nonfinite_streak)
            if streak >= exp.train.max_nonfinite_steps:
                checkpointer.wait()
                raise TrainingDiverged(
                    f"{streak} consecutive steps with a non-finite loss, gradient or updated state, each "
                    f"skipped (train.max_nonfinite_steps={exp.train.max_nonfinite_steps}); stopped at step "
                    f"{step}. {_newest_checkpoint_line(checkpointer)}"
                )
            checkpointer.check_for_errors()  # a failed asynchronous save stops the run at the next step
            last = step == exp.train.steps
            # Eval steps are logged too (else only multiples of both log_every and eval_every would be).
            eval_now = bool(exp.train.eval_every) and step % exp.train.eval_every == 0
            if step % exp.train.log_every == 0 or last or eval_now:
                m = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                record = {
                    "step": step,
                    "batch_size": batch_size,
                    "loss": float(m["loss"]),
                    "ce_loss": float(m["ce_loss"]),
                    "mtp_loss": float(m.get("mtp_loss", float("nan"))),
                    "grad_norm": float(m["grad_norm"]),
                    "lr": float(m["learning_rate"]),
                    "tokens_per_s": tokens_per_s,
                    "mfu": flops_per_token * tokens_per_s / (peak * jax.device_count()),
                    "load_max_over_mean": float(np.mean(m["load_max_over_mean"])),
                    "load_cv": float(np.mean(m["load_cv"])),
                    "skipped_steps": int(state.skipped_steps),
                    "moe_dropped": int(m["moe_dropped"]),  # this step's; always 0 unless moe_capacity_factor > 0
                }
                if "z_loss" in m:
                    record["z_loss"] = float(m["z_loss"])
                for i, (mx, cv) in enumerate(zip(m["load_max_over_mean"], m["load_cv"])):
                    record[f"load_max_over_mean/layer_{i}"] = float(mx)
                    record[f"load_cv/layer_{i}"] = float(cv)
                record.update(fp8_records(m.get("fp8_stats")))
                if eval_now and data.heldout is not None:
                    record["heldout_loss"] = evaluate(
                        exp,
                        state.params,
                        state.expert_bias,
                        data.heldout,
                        eval_step,
                        batch_sharding,
                        exp.train.eval_batches,
                    )
                try:
                    log.write(record)
                except OSError as e:
                    raise RunStopped(f"cannot write {log.path}: {e.strerror or e}") from e
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    tok_s=f"{tokens_per_s:,.0f}",
                    load=f"{record['load_max_over_mean']:.2f}",
                )
                window_start, window_tokens = time.perf_counter(), 0
            bar.update(1)
            if (exp.checkpoint.every and step % exp.checkpoint.every == 0) or last:
                checkpointer.save(step, state, iterator.get_state())
        completed = True
    except CheckpointError as e:
        raise RunStopped(f"{e}; stopped at step {step}. {_newest_checkpoint_line(checkpointer)}") from e
    finally:
        bar.close()
        try:
            checkpointer.wait()
        except CheckpointError as e:
            if completed:  # else the error already on its way out says why the run stopped
                raise RunStopped(f"{e}. {_newest_checkpoint_line(checkpointer)}") from e
        finally:
            log.close()

    heldout = None
    if data.heldout is not None:
        heldout = evaluate(
            exp, state.params, state.expert_bias, data.heldout, eval_step, batch_sharding, exp.train.eval_batches
        )
    records = read_metrics(log.path) if is_main and log.path.exists() else []
    if is_main and records:
        plot_loss_curve(workdir, records, workdir / "loss_curve.png", reference=entropy)
    sample = ""
    if exp.train.sample_tokens:
        sample = sample_text(exp, state, data.tokenizer)
    checkpointer.close()
    return RunResult(step, records[-1]["loss"] if records else float("nan"), heldout, entropy, sample, records)


def sample_text(exp: Experiment, state, tokenizer) -> str:
    prompt = tokenizer.encode(exp.train.sample_prompt) or [tokenizer.eos_id]
    variables = {"params": state.params, "expert_bias": state.expert_bias}
    if jax.process_count() > 1:  # parameters span processes: gather a full copy on each host
        variables = multihost_utils.process_allgather(variables, tiled=True)
    variables = jax.device_get(variables)
    max_new = min(exp.train.sample_tokens, exp.model.max_position_embeddings - len(prompt))
    out = generate(
        exp.model,
        variables,
        [prompt],
        max_new_tokens=max_new,
        temperature=exp.train.sample_temperature,
        stop_tokens=[tokenizer.eos_id] if tokenizer.eos_id is not None else (),
        seed=exp.train.seed,
    )
    return exp.train.sample_prompt + tokenizer.decode(out.tokens[0, : int(out.lengths[0])].tolist())
