"""SFT: packed chat rows with an assistant-only loss mask, the data sources, init_from, and the
`ling-jax sft` stage end to end (tiny model, few steps; the long runs are marked slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ling_jax import hf
from ling_jax.config import ConfigError
from ling_jax.configs import get
from ling_jax.data import batch as batch_keys
from ling_jax.data import chat
from ling_jax.data.tokenizer import ByteTokenizer
from ling_jax.posttrain import sft as sft_stage
from ling_jax.posttrain.config import TASK_SOURCE, SFTConfig
from ling_jax.posttrain.sft_data import build_sft_datasets, pack_chats, task_conversations
from ling_jax.sharding import build_mesh
from ling_jax.tasks import arithmetic
from ling_jax.train import run_dir
from ling_jax.train.checkpointing import Checkpointer
from ling_jax.train.config import experiment_from_config
from ling_jax.train.init_from import InitError, load_init_variables
from ling_jax.train.run_dir import RunDirError
from ling_jax.train.state import create_sharded_state, make_optimizer

TOK = ByteTokenizer()


def test_packing_keeps_conversations_whole_and_masks_only_assistant_targets():
    convs = [chat.conversation(f"{i}+{i}", str(2 * i), think=False) for i in range(7)]
    rendered = [chat.render(c, TOK) for c in convs]
    lengths = [len(r.ids_L) for r in rendered]
    rows = pack_chats(rendered, seq_len=200, pad_id=TOK.pad_id)
    b = rows.batch(np.arange(len(rows)))
    # every conversation appears whole, in order, each in one row with its own segment id
    got = []
    for r in range(len(rows)):
        full = np.concatenate([b[batch_keys.INPUTS][r], b[batch_keys.TARGETS][r, -1:]])
        seg = np.concatenate([b[batch_keys.SEGMENT_IDS][r], [0]])
        for s in range(1, seg.max() + 1):
            got.append(full[seg == s].tolist())
            assert b[batch_keys.POSITIONS][r][b[batch_keys.SEGMENT_IDS][r] == s].tolist() == list(
                range((seg == s).sum())
            )
    assert got == [r.ids_L.tolist() for r in rendered]
    assert sum(lengths) <= len(rows) * 201 and len(rows) == -(-sum(lengths) // (201 // lengths[0] * lengths[0]))
    # the loss mask is 1 exactly on targets the assistant wrote: each reply and its stop token
    mask = b[batch_keys.LOSS_MASK].astype(bool)
    targets = b[batch_keys.TARGETS][mask].tolist()
    expected = [t for r in rendered for t in r.ids_L[r.assistant_mask_L].tolist()]
    assert targets == expected
    assert not mask[b[batch_keys.SEGMENT_IDS] == 0].any()
    with pytest.raises(ValueError, match="conversation 0 renders to .* tokens, more than a training row holds"):
        pack_chats(rendered, seq_len=50, pad_id=TOK.pad_id)


def test_task_data_mixes_modes_and_holds_out_other_problems():
    sft = SFTConfig(train_problems=400, heldout_loss_problems=50)
    data = build_sft_datasets(TASK_SOURCE, "byte", 256, 0, 0.0, sft)
    assert data.train.num_conversations == 400 and data.heldout.num_conversations == 50
    text = TOK.decode(data.train.tokens_L.tolist())
    assert text.count(chat.SYSTEM_THINK_ON) + text.count(chat.SYSTEM_THINK_OFF) == 400
    assert 120 < text.count(chat.SYSTEM_THINK_ON) < 280
    convs = task_conversations(arithmetic.make_split("train", 50, 0), 0.5, 0)
    for c in convs:
        think = c[0]["content"] == chat.SYSTEM_THINK_ON
        assert (arithmetic.THINK_OPEN in c[2]["content"]) == think
        assert arithmetic.VERBOSE_STEP not in c[2]["content"]  # verbose_fraction defaults to 0


def test_task_data_verbose_fraction_pads_think_on_traces_only():
    problems = arithmetic.make_split("train", 400, 0)
    plain = task_conversations(problems, 0.5, 0)
    convs = task_conversations(problems, 0.5, 0, verbose_fraction=0.75)
    think_on = [c for c in convs if c[0]["content"] == chat.SYSTEM_THINK_ON]
    verbose = [c for c in think_on if f",{arithmetic.VERBOSE_STEP}{arithmetic.THINK_CLOSE}" in c[2]["content"]]
    assert 0.65 < len(verbose) / len(think_on) < 0.85
    for c, p, ref in zip(convs, problems, plain):
        assert c[0] == ref[0]  # the same modes as without filler: the draws are independent
        assert arithmetic.check(c[2]["content"], p)
        if c[0]["content"] == chat.SYSTEM_THINK_OFF:
            assert c[2]["content"] == p.answer


def test_jsonl_source_errors_name_the_line(tmp_path):
    good = json.dumps({"messages": chat.conversation("1+1", "2", think=False)})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good] * 4 + ['{"messages": [{"role": "user", "content": "x"}, {"role": "bot"}]}']))
    with pytest.raises(ValueError, match=r"d.jsonl:5: message 1 has no 'content'"):
        build_sft_datasets(str(path), "byte", 128, 0, 0.25, SFTConfig())
    path.write_text("\n".join([good] * 4))
    data = build_sft_datasets(str(path), "byte", 128, 0, 0.25, SFTConfig())
    assert data.train.num_conversations == 3 and data.heldout.num_conversations == 1


def test_sft_config_errors():
    config = get("tiny_sft")
    config.sft.think_fraction = 1.5
    with pytest.raises(ConfigError, match="sft.think_fraction"):
        sft_stage.split_config(config)
    config = get("tiny_sft")
    config.sft.verbose_fraction = -0.1
    with pytest.raises(ConfigError, match="sft.verbose_fraction"):
        sft_stage.split_config(config)
    values = get("tiny_sft").to_dict()
    values["sft"]["thinking"] = 1
    with pytest.raises(ConfigError, match="unknown sft config field"):
        sft_stage.split_config(values)


# ----------------------------------------------------------------------------------- init_from
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory holding one checkpoint of the tiny model, and an HF export of it."""
    exp = experiment_from_config(get("tiny"))
    workdir = tmp_path_factory.mktemp("init") / "run"
    workdir.mkdir()
    run_dir.write_config(workdir, exp, [], allowed_by_flag=False, step=None)
    state, _ = create_sharded_state(exp.model, make_optimizer(exp.train), build_mesh(exp.mesh.axes), 3)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=3, async_save=False)
    checkpointer.save(5, state, {})
    checkpointer.close()
    return exp, workdir, jax.device_get({"params": state.params, "expert_bias": state.expert_bias})


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_init_from_run_dir_and_hf_dir(saved_run, tmp_path):
    exp, workdir, expected = saved_run
    from_run = load_init_variables(workdir, exp.model)
    assert _equal(from_run, expected)
    hf.save_checkpoint(exp.model, from_run, tmp_path / "hf")
    assert _equal(load_init_variables(tmp_path / "hf", exp.model), expected)
    # runtime fields may differ; model fields may not, and the error names them
    assert _equal(load_init_variables(workdir, exp.model.replace(remat_policy="full")), expected)
    with pytest.raises(InitError, match=r"model.hidden_size: 128 -> 64; model.head_dim: 32 -> 16"):
        load_init_variables(workdir, exp.model.replace(hidden_size=64, head_dim=16))
    with pytest.raises(InitError, match=r"model.rope_theta: 10000.0 -> 5.0"):
        load_init_variables(tmp_path / "hf", exp.model.replace(rope_theta=5.0))
    with pytest.raises(InitError, match="not a directory"):
        load_init_variables(tmp_path / "missing", exp.model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InitError, match="no config.json"):
        load_init_variables(tmp_path / "empty", exp.model)


# ------------------------------------------------------------------------------ the SFT stage
def _small_sft_config(steps: int):
    config = get("tiny_sft")
    config.model.update(
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        num_layers=2,
        intermediate_size=64,
        num_experts=4,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=16,
        num_mtp_layers=0,
    )
    config.train.update(steps=steps, batch_size=4, log_every=1)
    config.checkpoint.update(every=2, async_save=False)
    config.sft.update(
        train_problems=64, heldout_loss_problems=8, eval_problems=8, eval_max_new_tokens=8, eval_batch_size=8
    )
    return config


@pytest.mark.slow  # ~20 s quiet (compiles the step and two decode shapes); minutes under load
def test_sft_stage_runs_and_reports_accuracy(tmp_path):
    workdir = tmp_path / "sft"
    result = sft_stage.run_sft(_small_sft_config(3), workdir, progress=False)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    last = records[-1]
    assert set(result.accuracy) == {
        "heldout_accuracy_think_on",
        "heldout_accuracy_think_off",
        "mean_response_length_think_on",
        "mean_response_length_think_off",
    }
    assert last["step"] == 3 and all(last[k] == v for k, v in result.accuracy.items())
    assert 0.0 <= last["heldout_accuracy_think_off"] <= 1.0 and 1 <= last["mean_response_length_think_on"] <= 8
    assert json.loads((workdir / "sft.json").read_text())["sft"]["eval_problems"] == 8
    # a resume with other SFT data settings is refused before anything is written
    config = _small_sft_config(5)
    config.sft.think_fraction = 1.0
    before = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"sft.think_fraction: 0.75 -> 1.0"):
        sft_stage.run_sft(config, workdir, progress=False)
    assert (workdir / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_sft_resume_reproduces_the_uninterrupted_losses(tmp_path):
    whole = sft_stage.run_sft(_small_sft_config(4), tmp_path / "whole", progress=False)
    sft_stage.run_sft(_small_sft_config(2), tmp_path / "cut", progress=False)
    resumed = sft_stage.run_sft(_small_sft_config(4), tmp_path / "cut", progress=False, allow_config_change=False)
    losses = lambda r: {x["step"]: x["loss"] for x in r.run.records if "loss" in x}  # noqa: E731
    assert losses(resumed)[3] == losses(whole)[3] and losses(resumed)[4] == losses(whole)[4]
    assert resumed.accuracy == whole.accuracy


@pytest.mark.slow
def test_sft_cli_from_init(tmp_path, saved_run):
    """`ling-jax sft --init RUN` on the tiny model: starts from the run's weights, prints the accuracy."""
    _, workdir, _ = saved_run
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ling_jax.cli",
            "sft",
            "--workdir",
            str(tmp_path / "w"),
            "--init",
            str(workdir),
            "--noprogress",
            "--config.train.steps=2",
            "--config.sft.eval_problems=4",
            "--config.sft.eval_batch_size=4",
            "--config.sft.train_problems=64",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "held-out accuracy (greedy): think-on" in out.stdout
    assert json.loads((tmp_path / "w" / "sft.json").read_text())["init"] == str(workdir.absolute())
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "ling_jax.cli",
            "sft",
            "--workdir",
            str(tmp_path / "w2"),
            "--init",
            str(workdir),
            "--config.model.hidden_size=64",
            "--config.model.head_dim=16",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode == 2 and "model.hidden_size: 128 -> 64" in bad.stderr
