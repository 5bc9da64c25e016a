"""The RL run: sample -> score -> group advantages -> `rl.updates_per_batch` jitted sharded updates,
with Orbax checkpoints, resume, metrics.jsonl / TensorBoard and a reward-curve PNG.

`run(exp, rl, workdir)` starts the policy and the frozen reference policy from `rl.init` (an SFT
run directory or a Hugging Face checkpoint: ling_jax/train/init_from.py), or resumes from the newest
usable checkpoint in `workdir` (the reference is re-read from `rl.init`). WORKDIR follows the
training run's rules (ling_jax/train/run_dir.py: lock, no foreign files, config.json compared on
resume) and adds rl.json (the `rl` section, compared the same way) and reward_curve.png.

Iteration i (1-based) draws `rl.prompts_per_iteration` training problems of the embedded task
(seeded by train.seed and i, so a resumed run sees the same ones), samples `rl.group_size`
completions of each at `rl.temperature` / `rl.top_p`, and logs one record with step = i. Greedy
held-out accuracy over the first `rl.heldout_problems` problems of the fixed held-out set (the ones
`ling-jax sft` reports on: ling_jax/posttrain/accuracy.py) is measured on the policy before the first
iteration's update (logged in record 1: the init checkpoint's accuracy), after the last
iteration's update (in the last record), and every `rl.eval_every` iterations.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from ling_jax.config import ConfigError
from ling_jax.data import chat, load_tokenizer
from ling_jax.posttrain import accuracy
from ling_jax.rl import rollout
from ling_jax.rl import update as keys
from ling_jax.rl.advantages import group_advantages
from ling_jax.rl.config import RLConfig, rl_to_dict
from ling_jax.rl.rewards import Reward, correctness_reward, format_reward, length_reward_fn, score
from ling_jax.sharding import build_mesh
from ling_jax.sharding.rules import mesh_axes
from ling_jax.tasks import arithmetic
from ling_jax.train import run_dir
from ling_jax.train.checkpointing import Checkpointer, CheckpointError
from ling_jax.train.config import Experiment
from ling_jax.train.init_from import load_init_variables
from ling_jax.train.loop import RunStopped, TrainingDiverged, _global_batch, restore_newest_good
from ling_jax.train.metrics_log import MetricsLog, read_metrics
from ling_jax.train.state import TrainState, make_optimizer, state_shardings

RL_CONFIG = "rl.json"
REWARD_CURVE = "reward_curve.png"
# rl fields that only say how long or how often: free to change on a resume
FREE_RL_FIELDS = {"iterations", "eval_every", "heldout_problems", "eval_batch_size"}


@dataclasses.dataclass
class RLResult:
    final_iteration: int
    heldout_first: float | None  # held-out accuracy of the policy the run started from (None after a resume)
    heldout_last: float
    records: list[dict]


def default_rewards(rl: RLConfig) -> list[Reward]:
    """correctness (task checker), format (<think> in think-off mode) and, when alpha > 0, length."""

    def check(completion, problem, **_):
        return arithmetic.check(completion, problem)

    rewards = [
        Reward("correctness", correctness_reward(check), rl.correctness_weight),
        Reward("format", format_reward, rl.format_weight),
    ]
    if rl.length_alpha > 0:
        length = length_reward_fn(check, rl.length_alpha, solved_groups_only=rl.length_solved_groups_only)
        rewards.append(Reward("length", length, 1.0))
    return rewards


def _check_rl_config(workdir: Path, rl: RLConfig, allow_change: bool) -> list:
    path = workdir / RL_CONFIG
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    new = rl_to_dict(rl)
    changes = [
        (f"rl.{k}", stored.get(k), new.get(k)) for k in sorted(set(stored) | set(new)) if stored.get(k) != new.get(k)
    ]
    fixed = [c for c in changes if c[0][3:] not in FREE_RL_FIELDS]
    if fixed and not allow_change:
        listed = "; ".join(f"{f}: {json.dumps(a)} -> {json.dumps(b)}" for f, a, b in fixed)
        raise run_dir.RunDirError(
            f"--workdir {workdir} holds an RL run with other settings ({listed}); use another --workdir, or "
            "pass --allow_config_change to resume with them"
        )
    return changes


def _write_rl_config(workdir: Path, rl: RLConfig) -> None:
    tmp = workdir / f".{RL_CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(rl_to_dict(rl), indent=2) + "\n")
    os.replace(tmp, workdir / RL_CONFIG)


def run(
    exp: Experiment,
    rl: RLConfig,
    workdir: str | Path,
    *,
    progress: bool = True,
    allow_config_change: bool = False,
    rewards: list[Reward] | None = None,
) -> RLResult:
    """Runs (or resumes) RL in `workdir`. Raises RunDirError, RunStopped, ConfigError or InitError, one line each."""
    if not rl.init:
        raise ConfigError("rl.init", "is empty: pass --init SFT_WORKDIR (the run RL starts from)")
    workdir = Path(workdir)
    init = load_init_variables(rl.init, exp.model)  # before WORKDIR is touched: a wrong --init writes nothing
    prepared = run_dir.prepare(workdir, exp, allow_change=allow_config_change, process_index=jax.process_index())
    try:
        _check_rl_config(workdir, rl, allow_config_change)  # refuses a change of fixed fields without the flag
        return _run(
            exp,
            rl,
            workdir,
            prepared,
            init,
            progress=progress,
            allow=allow_config_change,
            rewards=rewards or default_rewards(rl),
        )
    finally:
        prepared.lock.release()


def _run(
    exp: Experiment, rl: RLConfig, workdir: Path, prepared, init: dict, *, progress: bool, allow: bool, rewards
) -> RLResult:
    is_main = jax.process_index() == 0
    mesh = build_mesh(exp.mesh.axes)
    shards = int(np.prod([mesh.shape[a] for a in mesh_axes("activation_batch", mesh.axis_names)]))
    if rl.batch_rows % shards:
        raise ConfigError(
            "rl.prompts_per_iteration",
            f"x rl.group_size = {rl.batch_rows} rows are not divisible by the batch-parallel devices "
            f"mesh.data x mesh.fsdp x mesh.expert = {shards}",
        )
    tokenizer = load_tokenizer(exp.data.tokenizer)
    stop_id = chat.role_end_id(tokenizer)
    pad_id = exp.model.pad_token_id if exp.model.pad_token_id is not None else 0
    task_cfg = arithmetic.TaskConfig(max_digits=rl.task_max_digits)
    heldout = accuracy.heldout_problems(rl.heldout_problems, task_cfg)

    optimizer = make_optimizer(exp.train)
    abstract, shardings = state_shardings(exp.model, optimizer, mesh)
    checkpointer = Checkpointer(
        workdir / run_dir.CHECKPOINTS, keep=exp.checkpoint.keep, async_save=exp.checkpoint.async_save
    )
    ref_params = jax.device_put(init["params"], shardings.params)
    ref_bias = jax.device_put(init.get("expert_bias", {}), shardings.expert_bias)
    restored = restore_newest_good(checkpointer, abstract, shardings)
    if is_main:
        run_dir.write_config(
            workdir, exp, prepared.changes, allowed_by_flag=allow, step=restored[0] if restored else None
        )
        _write_rl_config(workdir, rl)
    if restored is not None:
        start_iteration, state, data_state = restored
        start_iteration = int(data_state.get("iteration", start_iteration))
        print(f"resumed from {checkpointer.directory}/{start_iteration}")
    else:
        start_iteration = 0
        params = jax.device_put(init["params"], shardings.params)

        def fresh(params):
            return TrainState(
                step=jax.numpy.int32(0),
                params=params,
                expert_bias=ref_bias,
                opt_state=optimizer.init(params),
                nonfinite_streak=jax.numpy.int32(0),
                skipped_steps=jax.numpy.int32(0),
            )

        state = jax.jit(fresh, out_shardings=shardings)(params)
    num_new = rl.max_new_tokens
    rl_step = keys.make_rl_step(exp.model, rl, optimizer, mesh, shardings, num_new)
    logprob_fn = keys.make_logprob_fn(exp.model, mesh, shardings.params, shardings.expert_bias, num_new)
    batch_shardings = keys.batch_shardings(mesh)

    def variables():
        return {"params": state.params, "expert_bias": state.expert_bias}

    def evaluate():
        result = accuracy.task_accuracy(
            exp.model,
            jax.device_get(variables()),
            tokenizer,
            heldout,
            think=rl.think,
            max_new_tokens=rl.max_new_tokens,
            batch_size=min(rl.eval_batch_size, len(heldout)),
        )
        return result.accuracy, result.mean_length

    log = MetricsLog(workdir, enabled=is_main)
    heldout_first = None
    last_accuracy = float("nan")
    bar = tqdm(total=rl.iterations, initial=start_iteration, disable=not (progress and is_main), unit="it")
    iteration = start_iteration
    completed = False
    try:
        while iteration < rl.iterations:
            iteration += 1
            record: dict = {"step": iteration}
            if rl.heldout_problems and iteration == 1:
                heldout_first, length = evaluate()
                record.update(heldout_accuracy=heldout_first, heldout_response_length=length)
                print(f"held-out accuracy of the init policy ({len(heldout)} problems): {heldout_first:.3f}")
            problems = arithmetic.make_split(
                "train", rl.prompts_per_iteration, seed=exp.train.seed * 1_000_003 + iteration, config=task_cfg
            )
            rows = [p for p in problems for _ in range(rl.group_size)]
            prompts = rollout.prompt_ids(rows, tokenizer, rl.think)
            sample = rollout.sample_rollout(
                exp.model,
                variables(),
                prompts,
                tokenizer,
                rl=rl,
                seed=exp.train.seed * 1_000_003 + iteration,
                stop_id=stop_id,
                pad_id=pad_id,
                mesh=mesh,
            )
            columns = {
                "problem": rows,
                "group": np.repeat(np.arange(rl.prompts_per_iteration), rl.group_size).tolist(),
                "lengths": sample.lengths_R.tolist(),
                "think": [rl.think] * len(rows),
            }
            total_R, parts = score(rewards, [p.prompt for p in rows], sample.completions, **columns)
            batch = dict(sample.batch, **{keys.ADVANTAGES: group_advantages(total_R, rl.group_size)})
            device_batch = {k: _global_batch({k: v}, batch_shardings[k])[k] for k, v in batch.items()}
            ref_logp, _ = logprob_fn(ref_params, ref_bias, device_batch)
            device_batch[keys.REF_LOGP] = ref_logp
            step_stats = []
            for _ in range(rl.updates_per_batch):
                state, stats = rl_step(state, device_batch)
                step_stats.append(jax.device_get(stats))
            streak = int(state.nonfinite_streak)
            if streak >= exp.train.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{streak} consecutive RL updates with a non-finite loss, gradient or updated state, each "
                    f"skipped (train.max_nonfinite_steps={exp.train.max_nonfinite_steps}); stopped at iteration "
                    f"{iteration}"
                )
            correct_R = np.asarray(parts.get("correctness", np.zeros_like(total_R)))
            record.update(
                reward=float(total_R.mean()),
                reward_std=float(total_R.std()),
                **{f"reward/{name}": float(v.mean()) for name, v in parts.items()},
                train_accuracy=float((correct_R > 0).mean()),
                response_length=float(sample.lengths_R.mean()),
                sampler_tokens_per_s=sample.tokens_per_s,
                zero_advantage_groups=int(np.sum(np.ptp(total_R.reshape(-1, rl.group_size), axis=1) == 0)),
                loss=float(np.mean([s["loss"] for s in step_stats])),
                pg_loss=float(np.mean([s["pg_loss"] for s in step_stats])),
                clip_fraction=float(np.mean([s["clip_fraction"] for s in step_stats])),
                kl=float(np.mean([s["kl"] for s in step_stats])),
                entropy=float(np.mean([s["entropy"] for s in step_stats])),
                grad_norm=float(np.mean([s["grad_norm"] for s in step_stats])),
                skipped_steps=int(state.skipped_steps),
            )
            last = iteration == rl.iterations
            if rl.heldout_problems and (last or (rl.eval_every and iteration % rl.eval_every == 0)):
                last_accuracy, length = evaluate()
                record.update(heldout_accuracy=last_accuracy, heldout_response_length=length)
                if last:
                    print(f"held-out accuracy after {iteration} RL iterations: {last_accuracy:.3f}")
            try:
                log.write(record)
            except OSError as e:
                raise RunStopped(f"cannot write {log.path}: {e.strerror or e}") from e
            bar.set_postfix(reward=f"{record['reward']:.3f}", len=f"{record['response_length']:.1f}")
            bar.update(1)
            checkpointer.check_for_errors()
            if (exp.checkpoint.every and iteration % exp.checkpoint.every == 0) or last:
                checkpointer.save(iteration, state, {"iteration": iteration})
        completed = True
    except CheckpointError as e:
        raise RunStopped(f"{e}; stopped at iteration {iteration}") from e
    finally:
        bar.close()
        try:
            checkpointer.wait()
        except CheckpointError as e:
            if completed:
                raise RunStopped(str(e)) from e
        finally:
            log.close()
            checkpointer.close()
    records = read_metrics(log.path) if is_main and log.path.exists() else []
    if is_main and records:
        plot_reward_curve(records, workdir / REWARD_CURVE, title=f"{workdir} ({rl.objective})")
    return RLResult(iteration, heldout_first, last_accuracy, records)


def plot_reward_curve(records: list[dict], out_png: Path, title: str = "") -> None:
    """Reward (total and per function) per iteration, with held-out accuracy where measured."""
    # A Figure of its own, drawn by the Agg canvas savefig picks: no pyplot, so the caller's backend
    # (a notebook's inline one) and its open figures are left alone.
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in records])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [r["reward"] for r in records], label="reward (total)")
    for name in sorted({k for r in records for k in r if k.startswith("reward/")}):
        ax.plot(steps, [r.get(name, np.nan) for r in records], label=name, alpha=0.7)
    held = [(r["step"], r["heldout_accuracy"]) for r in records if "heldout_accuracy" in r]
    if held:
        ax.plot(*zip(*held), "o--", label="held-out accuracy (greedy)")
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("mean reward / accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
