"""The RL loop's pieces on a small random model: the sampler's recorded log-probs equal the trainer's
teacher-forced ones, the jitted update's zero-advantage and direction properties, config errors;
and (slow) the whole loop with checkpoints, resume and metrics, and the main job of the issue."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from multidevice.common import run_cli, small_config

from ling_jax.config import ConfigError
from ling_jax.data import chat, load_tokenizer
from ling_jax.rl import update as keys
from ling_jax.rl.config import rl_defaults, rl_from_config
from ling_jax.rl.rollout import prompt_ids, sample_rollout
from ling_jax.sharding import build_mesh
from ling_jax.tasks import arithmetic
from ling_jax.train.state import create_sharded_state, make_optimizer

N = 12  # response tokens


def rl_config(**rl):
    config = small_config(model=dict(max_position_embeddings=128), train=dict(warmup_steps=0, learning_rate=1e-2))
    config.rl = rl_defaults()
    defaults = dict(
        prompts_per_iteration=2,
        group_size=4,
        max_new_tokens=N,
        task_max_digits=2,
        heldout_problems=8,
        eval_batch_size=8,
        iterations=2,
    )
    config.rl.update({**defaults, **rl})
    return config


@pytest.fixture(scope="module")
def setup():
    exp, rl = rl_from_config(rl_config())
    mesh = build_mesh(exp.mesh.axes)
    optimizer = make_optimizer(exp.train)
    state, shardings = create_sharded_state(exp.model, optimizer, mesh, seed=0)
    tokenizer = load_tokenizer(exp.data.tokenizer)
    problems = arithmetic.make_split("train", rl.prompts_per_iteration, seed=1, config=arithmetic.TaskConfig(2))
    rows = [p for p in problems for _ in range(rl.group_size)]
    stop = chat.role_end_id(tokenizer)
    variables = {"params": state.params, "expert_bias": state.expert_bias}
    sample = sample_rollout(
        exp.model, variables, prompt_ids(rows, tokenizer, False), tokenizer, rl=rl, seed=3, stop_id=stop, pad_id=257
    )
    logprob_fn = keys.make_logprob_fn(exp.model, mesh, shardings.params, shardings.expert_bias, N)
    return dict(
        exp=exp,
        rl=rl,
        mesh=mesh,
        optimizer=optimizer,
        state=state,
        shardings=shardings,
        sample=sample,
        logprob_fn=logprob_fn,
    )


def device_batch(batch, mesh):
    shardings = keys.batch_shardings(mesh)
    return {k: jax.device_put(np.asarray(v), shardings[k]) for k, v in batch.items()}


def test_sampler_logprobs_equal_teacher_forced(setup):
    sample, state = setup["sample"], setup["state"]
    logp, entropy = setup["logprob_fn"](state.params, state.expert_bias, device_batch(sample.batch, setup["mesh"]))
    mask = sample.batch[keys.MASK] > 0
    assert mask.sum() > 20 and np.all(sample.lengths_R >= 1)
    old = sample.batch[keys.OLD_LOGP]
    assert np.all(old[mask] < 0)
    np.testing.assert_allclose(np.asarray(logp)[mask], old[mask], atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(entropy)[mask] > 0)


@pytest.fixture(scope="module")
def rl_step(setup):
    """The jitted update, compiled once for the tests below (beta > 0: the KL term is traced)."""
    rl = dataclasses.replace(setup["rl"], beta=0.1)
    return keys.make_rl_step(setup["exp"].model, rl, setup["optimizer"], setup["mesh"], setup["shardings"], N)


def _step(setup, rl_step, advantages):
    state = jax.tree.map(lambda x: x.copy(), setup["state"])  # the step donates its state
    batch = dict(setup["sample"].batch, **{keys.ADVANTAGES: np.asarray(advantages, np.float32)})
    batch[keys.REF_LOGP] = batch[keys.OLD_LOGP]  # reference == current policy: KL 0, no KL gradient
    new_state, stats = rl_step(state, device_batch(batch, setup["mesh"]))
    return new_state, jax.device_get(stats)


@pytest.mark.slow  # compiling the update: ~25 s
def test_zero_advantages_give_a_finite_zero_gradient(setup, rl_step):
    _, stats = _step(setup, rl_step, np.zeros(8))
    # The policy term is exactly 0; what gradient is left is the KL term's, from the ~1e-6 difference
    # between the sampler's and the trainer's log-probs of the reference (= current) policy.
    assert stats["finite"] and stats["pg_loss"] == 0.0 and stats["grad_norm"] < 1e-6
    assert stats["clip_fraction"] == 0.0 and abs(stats["kl"]) < 1e-6


@pytest.mark.slow
def test_update_raises_the_logprob_of_advantaged_responses(setup, rl_step):
    mesh = setup["mesh"]
    adv = np.array([1.0, -1.0, 0, 0, 0, 0, 0, 0], np.float32)
    new_state, stats = _step(setup, rl_step, adv)
    assert stats["finite"] and stats["grad_norm"] > 0
    logp, _ = setup["logprob_fn"](new_state.params, new_state.expert_bias, device_batch(setup["sample"].batch, mesh))
    batch = setup["sample"].batch
    mask = batch[keys.MASK]
    mean_delta = ((np.asarray(logp) - batch[keys.OLD_LOGP]) * mask).sum(1) / mask.sum(1)
    assert mean_delta[0] > 0 > mean_delta[1]


def test_config_errors():
    with pytest.raises(ConfigError, match="rl.group_size.*no group variance"):
        rl_from_config(rl_config(group_size=1))
    with pytest.raises(ConfigError, match="rl.objective"):
        rl_from_config(rl_config(objective="ppo"))
    config = rl_config()
    config.rl.unlock()
    config.rl.bogus = 1
    with pytest.raises(ConfigError, match="unknown rl config field"):
        rl_from_config(config)
    from ling_jax.rl.loop import run

    exp, rl = rl_from_config(rl_config())
    with pytest.raises(ConfigError, match="rl.init"):
        run(exp, rl, "/nonexistent-never-created")


# --------------------------------------------------------------------------- slow: whole runs
def _init_dir(path: Path, exp) -> Path:
    """A ling-jax run directory holding one checkpoint of a random small model (an "SFT" run)."""
    from ling_jax.train import run_dir
    from ling_jax.train.checkpointing import Checkpointer

    path.mkdir(parents=True)
    mesh = build_mesh(exp.mesh.axes)
    state, _ = create_sharded_state(exp.model, make_optimizer(exp.train), mesh, seed=0)
    run_dir.write_config(path, exp, [], allowed_by_flag=False, step=None)
    checkpointer = Checkpointer(path / "checkpoints", keep=1, async_save=False)
    checkpointer.save(1, state, {})
    checkpointer.close()
    return path


@pytest.mark.slow
def test_loop_metrics_checkpoints_and_resume(tmp_path):
    from ling_jax.rl.loop import run

    exp, rl = rl_from_config(rl_config(iterations=3))
    rl = dataclasses.replace(rl, init=str(_init_dir(tmp_path / "init", exp)))
    full = run(exp, rl, tmp_path / "full", progress=False)
    first_two = run(exp, dataclasses.replace(rl, iterations=2), tmp_path / "split", progress=False)
    resumed = run(exp, rl, tmp_path / "split", progress=False)
    assert [r["step"] for r in full.records] == [1, 2, 3]
    for key in ("reward", "reward/correctness", "reward/format", "response_length", "clip_fraction", "kl", "entropy"):
        assert all(np.isfinite(r[key]) for r in full.records), key
    assert "sampler_tokens_per_s" in full.records[0]
    assert "heldout_accuracy" in full.records[0] and "heldout_accuracy" in full.records[-1]
    assert (tmp_path / "full" / "reward_curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "full" / "rl.json").read_text())["objective"] == "lpo"
    # the resumed run continues with the same samples and updates as the uninterrupted one
    assert resumed.heldout_first is None and first_two.records[-1]["step"] == 2
    assert resumed.records[-1]["loss"] == pytest.approx(full.records[-1]["loss"], rel=1e-5, abs=1e-7)
    assert resumed.records[-1]["reward"] == full.records[-1]["reward"]


@pytest.mark.slow
def test_main_job_sft_then_rl(tmp_path):
    """The issue's main job with the default presets: RL raises held-out accuracy by >= 10 points
    over the SFT checkpoint, and the mean response length does not grow."""
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    # XLA's default optimisation, as a user runs the commands: the suite's fast-compile flags halve the
    # speed and change the numerics (the SFT preset ended at 31.4% think-on with them, 44.2% without).
    run_cli("sft", "--workdir", str(sft), "--noprogress", timeout=1800, fast_compile=False)
    out = run_cli("rl", "--init", str(sft), "--workdir", str(rl), "--noprogress", timeout=1800, fast_compile=False)
    records = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert "held-out accuracy" in out.stdout
    assert last["heldout_accuracy"] - first["heldout_accuracy"] >= 0.10
    assert last["heldout_response_length"] <= first["heldout_response_length"]


def test_tiny_rl_preset_fits_tiny_sft():
    from ling_jax.configs import get
    from ling_jax.train.config import experiment_from_config

    sft = get("tiny_sft")
    exp, rl = rl_from_config(get("tiny_rl"))
    sft_config = sft.to_dict()
    sft_section = sft_config.pop("sft")
    assert exp.model == experiment_from_config(sft_config).model  # --init W1 restores into this model
    assert rl.task_max_digits == sft_section["task_max_digits"] and rl.objective == "lpo" and rl.think
