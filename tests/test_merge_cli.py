"""WSM through the CLI: `ling-jax merge` averages the last K+1 checkpoints of a constant-LR run with
decay-emulating weights into a normal run directory (and optionally a HF checkpoint), and
`ling-jax eval` scores it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from multidevice.common import run_cli, train_cli


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _states(workdir: Path, steps):
    from ling_jax.train.run_dir import load_experiment, restore

    exp = load_experiment(workdir)
    return {s: jax.device_get(restore(workdir, exp, s)[0]) for s in steps}


def _heldout(workdir: Path) -> float:
    return json.loads(run_cli("eval", "--workdir", str(workdir)).stdout.strip().splitlines()[-1])["heldout_loss"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("short")
    train_cli(workdir, train=dict(steps=6, sample_tokens=0, log_every=3), checkpoint=dict(every=2, keep=4))
    return workdir


def test_merge_is_the_weighted_sum_of_checkpoints(short_run, tmp_path):
    from ling_jax.hf import load_checkpoint
    from ling_jax.train.merge_weights import merge_coefficients
    from ling_jax.train.run_dir import checkpointer_for, load_experiment

    out, hf = tmp_path / "merged", tmp_path / "hf"
    proc = run_cli(
        "merge",
        "--workdir",
        str(short_run),
        "--window",
        "2",
        "--decay",
        "1-sqrt",
        "--out",
        str(out),
        "--hf_out",
        str(hf),
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    coefficients = merge_coefficients("1-sqrt", 2)
    assert report["steps"] == [2, 4, 6] and report["decay"] == "1-sqrt"
    np.testing.assert_allclose(report["coefficients"], coefficients, rtol=1e-12)

    states = _states(short_run, [2, 4, 6])
    exp = load_experiment(out)
    assert exp == load_experiment(short_run)
    assert checkpointer_for(out, exp).all_steps() == [6]
    merged = _states(out, [6])[6]
    for collection in ("params", "expert_bias"):
        got = _flat(getattr(merged, collection))
        parts = [_flat(getattr(states[s], collection)) for s in (2, 4, 6)]
        assert got.keys() == parts[0].keys()
        for name, value in got.items():
            want = sum(c * p[name].astype(np.float64) for c, p in zip(coefficients, parts))
            assert value.dtype == parts[0][name].dtype
            # float32 accumulation of 3 terms: a few ulps.
            np.testing.assert_allclose(value, want, rtol=2e-6, atol=1e-9, err_msg=f"{collection}{name}")
        # The checkpoints differ, so this is a real average, not a copy of one of them.
        assert any(not np.array_equal(parts[0][n], parts[2][n]) for n in got)
    # The rest of the state (step, optimizer, counters) is the last checkpoint's, so training can go on.
    assert int(merged.step) == 6
    for a, b in zip(jax.tree.leaves(merged.opt_state), jax.tree.leaves(states[6].opt_state)):
        np.testing.assert_array_equal(a, b)

    # The HF export holds the merged weights.
    hf_cfg, variables = load_checkpoint(hf)
    assert hf_cfg.num_experts == exp.model.num_experts and hf_cfg.num_mtp_layers == exp.model.num_mtp_layers
    for collection in ("params", "expert_bias"):
        exported, ours = _flat(variables[collection]), _flat(getattr(merged, collection))
        assert exported.keys() == ours.keys()
        for name in ours:
            np.testing.assert_array_equal(exported[name], ours[name], err_msg=f"{collection}{name}")


def test_merge_needs_window_plus_one_checkpoints(short_run, tmp_path):
    proc = run_cli("merge", "--workdir", str(short_run), "--window", "3", "--out", str(tmp_path / "m"), check=False)
    assert proc.returncode != 0
    assert "--window 3 needs 4 checkpoints" in proc.stderr and "[2, 4, 6]" in proc.stderr
    assert not (tmp_path / "m").exists()


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _refused(*args: str) -> str:
    proc = run_cli("merge", *args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("window", ["0", "-3"])
def test_merge_window_below_one_has_one_message(tmp_path, window):
    stderr = _refused("--workdir", str(tmp_path / "run"), f"--window={window}", "--out", str(tmp_path / "m"))
    assert f"--window must be at least 1 (the last K+1 checkpoints are merged), got {window}" in stderr
    assert "needs" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_to_write_into_its_own_or_another_run(short_run, tmp_path):
    """--out = --workdir, --out = another run (holding the merged step and later), --hf_out = a run
    directory or a directory with a user's file: each refused before any work, every file kept."""
    other = tmp_path / "other_run"
    shutil.copytree(short_run, other)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    before = {d: _snapshot(d) for d in (short_run, other, user)}
    base = ["--workdir", str(short_run), "--window", "1"]
    cases = [
        (["--out", str(short_run)], "is the --workdir"),
        (["--out", str(other)], f"--out {other} is not empty ("),
        (["--out", str(tmp_path / "m"), "--hf_out", str(short_run)], "is the --workdir"),
        (["--out", str(tmp_path / "m"), "--hf_out", str(other)], "holds files that are not part of a HF checkpoint"),
        (["--out", str(tmp_path / "m"), "--hf_out", str(user)], "(notes.txt)"),
        (["--out", str(tmp_path / "m"), "--hf_out", str(tmp_path / "m")], "is the --out"),
        (["--out", str(user / "m"), "--hf_out", str(user)], "lies inside --hf_out"),
    ]
    for extra, message in cases:
        stderr = _refused(*base, *extra)
        assert message in stderr, (extra, stderr)
        assert {d: _snapshot(d) for d in before} == before, extra
        assert not (tmp_path / "m").exists() and not (user / "m").exists()


def test_merge_into_an_existing_empty_directory(short_run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    run_cli("merge", "--workdir", str(short_run), "--window", "1", "--out", str(out))
    from ling_jax.train.run_dir import checkpointer_for, load_experiment

    assert checkpointer_for(out, load_experiment(out)).all_steps() == [6]


def test_a_merge_that_fails_late_removes_only_what_it_wrote(short_run, tmp_path):
    """--hf_out under a user's file passes the early checks but cannot be created: the merged run
    directory written before is removed, the user's file and the source run are kept."""
    (tmp_path / "notes.txt").write_text("mine")
    before = {d: _snapshot(d) for d in (short_run, tmp_path)}
    out, hf_out = tmp_path / "m", tmp_path / "notes.txt" / "hf"
    stderr = _refused("--workdir", str(short_run), "--window", "1", "--out", str(out), "--hf_out", str(hf_out))
    assert f"--hf_out {hf_out}:" in stderr and f"{out} removed" in stderr
    assert {d: _snapshot(d) for d in before} == before


@pytest.mark.slow
def test_wsm_merge_beats_the_last_checkpoint(tmp_path):
    """A constant-LR run (after warmup) on a tiny-ish model; the 1-sqrt merge of its last K+1 = 9
    checkpoints has a lower held-out loss than the last checkpoint alone."""
    from ling_jax.hf import load_checkpoint

    run, out, hf = tmp_path / "run", tmp_path / "merged", tmp_path / "hf"
    window = 8
    train_cli(
        run,
        model=WSM_MODEL,
        train=WSM_TRAIN,
        data=dict(max_tokens=WSM_TOKENS),
        checkpoint=dict(every=WSM_EVERY, keep=window + 1),
    )
    run_cli(
        "merge",
        "--workdir",
        str(run),
        "--window",
        str(window),
        "--decay",
        "1-sqrt",
        "--out",
        str(out),
        "--hf_out",
        str(hf),
    )
    merged_loss, last_loss = _heldout(out), _heldout(run)
    print(f"\nheld-out loss: last checkpoint {last_loss:.4f}, 1-sqrt merge of the last {window + 1}: {merged_loss:.4f}")
    assert merged_loss < last_loss
    _, variables = load_checkpoint(hf)
    merged = _states(out, [WSM_TRAIN["steps"]])[WSM_TRAIN["steps"]]
    for name, value in _flat(merged.params).items():
        np.testing.assert_array_equal(_flat(variables["params"])[name], value)


WSM_MODEL: dict = {}
WSM_TRAIN = dict(steps=400, learning_rate=1e-2, warmup_steps=20, log_every=10, sample_tokens=0)
WSM_EVERY = 10
WSM_TOKENS = 200_000
