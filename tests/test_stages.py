"""The recipe's stages: the 4K / 32K / 128K presets of every size, the batch ramp's schedule and a
ramped run that resumes exactly, and `ling-jax train --init PREV_WORKDIR` starting a stage from the
previous stage's weights (parameters and expert biases carried over, a fresh optimizer and step)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from multidevice.common import small_experiment, train_cli

from ling_jax.configs import get
from ling_jax.train.config import experiment_from_config
from ling_jax.train.ramp import BatchSchedule

SIZES = ("ling_mini_2", "ling_flash_2", "ling_1t")


@pytest.mark.parametrize("size", SIZES)
def test_stage_presets_follow_the_recipe(size):
    base = experiment_from_config(get(size))
    assert base.train.seq_len == 4096 and base.model.rope_theta == 10000.0 and base.model.rope_scaling is None
    assert (base.train.batch_ramp.start, base.train.batch_ramp.tokens) == (3024, 500e9)
    assert base.train.bias_update_rate == 1e-3
    for suffix, seq_len in (("32k", 32768), ("128k", 131072)):
        stage = experiment_from_config(get(f"{size}_{suffix}"))
        assert stage.train.seq_len == stage.model.max_position_embeddings == seq_len
        assert stage.model.rope_theta == 600000.0
        assert stage.train.bias_update_rate == 1e-4
        assert stage.model.attention_impl == "splash" and stage.mesh.context > 1
        assert not stage.train.batch_ramp.enabled
        # the model's parameters are the 4K stage's: --init can carry them over
        for field in ("hidden_size", "num_layers", "num_experts", "vocab_size", "num_heads", "head_dim"):
            assert getattr(stage.model, field) == getattr(base.model, field)
        if suffix == "32k":
            assert stage.model.rope_scaling is None
            assert stage.train.steps == math.ceil(150e9 / (stage.train.batch_size * seq_len))  # 150B tokens
        else:
            scaling = stage.model.rope_scaling
            assert (scaling.factor, scaling.original_max_position_embeddings) == (4.0, 32768)


def test_batch_ramp_schedule_grows_in_whole_microbatches_to_the_peak():
    config = get("ling_1t")
    train = experiment_from_config(config).train
    schedule = BatchSchedule(train)
    b, T = train.microbatch_size, train.seq_len
    segments = schedule.segments()
    assert segments[0] == (0, math.ceil(3024 / b))  # the start rounded up to whole microbatches
    assert segments[-1][1] == train.microbatches  # the peak
    counts = [m for _, m in segments]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    # the peak is reached after about the ramp's 500B tokens, never before the target says so
    last = segments[-1][0]
    assert 500e9 <= schedule.tokens_before(last) <= 500e9 + train.batch_size * T
    for step in range(0, last + 10, 97):
        target = 3024 + (train.batch_size - 3024) * min(1.0, schedule.tokens_before(step) / 500e9)
        assert schedule.batch_size(step) <= max(target, math.ceil(3024 / b) * b)
        assert schedule.tokens_before(step + 1) - schedule.tokens_before(step) == schedule.batch_size(step) * T
    # no ramp: the peak from the first step
    config.train.batch_ramp.start = 0
    flat = BatchSchedule(experiment_from_config(config).train)
    assert flat.segments() == [(0, train.microbatches)]


def test_batch_ramp_needs_microbatches():
    from multidevice.common import small_config

    from ling_jax.config import ConfigError

    config = small_config(train=dict(batch_size=8, microbatches=1))
    config.train.batch_ramp.update(start=2, tokens=1000.0)
    with pytest.raises(ConfigError, match=r"train\.batch_ramp.*needs train\.microbatches > 1"):
        experiment_from_config(config)


RAMP = dict(batch_size=8, microbatches=4, steps=6, sample_tokens=0, eval_every=0)
RAMP_FLAGS = ["--config.train.batch_ramp.start=2", "--config.train.batch_ramp.tokens=256"]


@pytest.mark.slow  # three CLI runs, each compiling one step per batch size
def test_ramped_run_grows_the_batch_and_resumes_exactly(tmp_path):
    from ling_jax.train.metrics_log import read_metrics

    exp = small_experiment(train=RAMP)
    import dataclasses

    ramp = dataclasses.replace(exp.train.batch_ramp, start=2, tokens=256.0)
    schedule = BatchSchedule(dataclasses.replace(exp.train, batch_ramp=ramp))
    expected = [schedule.batch_size(s) for s in range(6)]
    assert expected[0] == 2 and expected[-1] == 8 and len(set(expected)) > 2

    whole = tmp_path / "whole"
    train_cli(whole, *RAMP_FLAGS, train=RAMP, checkpoint=dict(every=3))
    split = tmp_path / "split"
    train_cli(split, *RAMP_FLAGS, train=dict(RAMP, steps=3), checkpoint=dict(every=3))
    train_cli(split, *RAMP_FLAGS, train=RAMP, checkpoint=dict(every=3))
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [r["batch_size"] for r in a] == expected
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # resumed exactly


@pytest.mark.slow  # two CLI runs and two restores
def test_init_starts_a_stage_from_the_previous_stage(tmp_path):
    from ling_jax.train import run_dir
    from ling_jax.train.init_from import load_init_variables

    first, second = tmp_path / "4k", tmp_path / "32k"
    train_cli(first, train=dict(steps=2, sample_tokens=0, eval_every=0), checkpoint=dict(every=2))
    # the next stage: RoPE theta 600k, bias rate 1e-4; warmup so that its first step's learning rate is 0
    stage = dict(steps=1, sample_tokens=0, eval_every=0, warmup_steps=5, bias_update_rate=1e-4)
    proc = train_cli(
        second, "--init", str(first), model=dict(rope_theta=600000.0), train=stage, checkpoint=dict(every=1)
    )
    assert proc.returncode == 0
    prev_exp = run_dir.load_experiment(first)
    prev = load_init_variables(first, prev_exp.model)
    exp = run_dir.load_experiment(second)
    state, _, step, _, _ = run_dir.restore(second, exp)
    assert step == 1 and int(state.step) == 1  # a fresh step count ...
    has_count = lambda x: hasattr(x, "count") and not callable(x.count)  # noqa: E731  (optax states; not tuple.count)
    counts = [s.count for s in jax.tree.leaves(state.opt_state, is_leaf=has_count) if has_count(s)]
    assert counts and all(int(c) == 1 for c in counts)  # ... and a fresh optimizer
    # lr(0) = 0: the parameters are the previous stage's, exactly
    for got, want in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(prev["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    # the expert biases carried over, then one balancing update at the stage's rate 1e-4
    deltas = [
        np.abs(np.asarray(got) - want)
        for got, want in zip(jax.tree.leaves(jax.device_get(state.expert_bias)), jax.tree.leaves(prev["expert_bias"]))
    ]
    assert max(float(d.max()) for d in deltas) <= 2e-4 + 1e-7 and max(float(d.max()) for d in deltas) > 0
    assert any(float(np.abs(w).max()) > 1e-3 for w in jax.tree.leaves(prev["expert_bias"]))  # rate 1e-2 in stage 1

    # a model that is not the previous stage's: one line, exit 2
    bad = train_cli(tmp_path / "bad", "--init", str(first), model=dict(hidden_size=64), train=stage, check=False)
    assert bad.returncode == 2 and "model.hidden_size" in bad.stderr
    assert json.loads((second / "config.json").read_text())["model"]["rope_theta"] == 600000.0
