"""Exact resume: a run killed with SIGKILL (during training, or in the middle of a checkpoint save)
and restarted produces bitwise the losses of the same run left alone.

Every run is a `ling-jax train` subprocess on the small test model (tests/multidevice/common.py);
all of them share one XLA compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from multidevice.common import finish_cli, start_cli, train_args, train_cli

STEPS, EVERY, KEEP = 40, 5, 3
RUN = dict(train=dict(steps=STEPS, sample_tokens=0), checkpoint=dict(every=EVERY, keep=KEEP))


def _metrics(workdir: Path) -> list[dict]:
    from ling_jax.train.metrics_log import read_metrics

    return read_metrics(Path(workdir) / "metrics.jsonl")


def _logged_lines(workdir: Path) -> int:
    path = Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _start(workdir: Path, devices: int = 1, mesh: dict | None = None) -> subprocess.Popen:
    return start_cli(*train_args(workdir, **RUN, mesh=mesh), num_devices=devices)


def _kill(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run was not killed (exit {proc.returncode}):\n{err[-3000:]}"
    return out


def _ended(proc: subprocess.Popen) -> str:
    """Why a run that should still be training is not."""
    out, err = proc.communicate()
    return f"run ended (exit {proc.returncode}) before it could be killed:\n{out[-2000:]}\n{err[-3000:]}"


def _finish(workdir: Path, devices: int = 1, mesh: dict | None = None) -> str:
    proc = train_cli(workdir, **RUN, mesh=mesh, num_devices=devices)
    return proc.stdout


def _resumed_step(stdout: str) -> int | None:
    m = re.search(r"resumed from \S+/(\d+)\s", stdout)
    return int(m.group(1)) if m else None


def _checkpoint_entries(workdir: Path) -> list[str]:
    folder = Path(workdir) / "checkpoints"
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _assert_same_run(resumed: list[dict], reference: list[dict]):
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for key in ("loss", "ce_loss", "mtp_loss", "grad_norm", "lr", "load_max_over_mean"):
        got = [r[key] for r in resumed]
        want = [r[key] for r in reference]
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert first_diff is None, (
            f"{key} differs from the uninterrupted run first at step {first_diff + 1}: "
            f"{got[first_diff]!r} vs {want[first_diff]!r}"
        )


class _Reference:
    """The uninterrupted run, started in the background; `records()` waits for its per-step metrics."""

    def __init__(self, workdir: Path, devices: int = 1, mesh: dict | None = None):
        self.workdir, self.proc, self._records = workdir, _start(workdir, devices, mesh), None

    def records(self) -> list[dict]:
        if self._records is None:
            finish_cli(self.proc)
            self._records = _metrics(self.workdir)
            assert len(self._records) == STEPS
        return self._records


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> _Reference:
    return _Reference(tmp_path_factory.mktemp("uninterrupted"))


def _kill_during_training_and_resume(workdir: Path, reference: _Reference, devices: int = 1, mesh=None):
    proc = _start(workdir, devices, mesh)
    deadline = time.monotonic() + 600
    # Kill once a few checkpoints exist and training is well under way (not at a save on purpose).
    while _logged_lines(workdir) < 17:
        assert proc.poll() is None, _ended(proc)
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.005)
    _kill(proc)
    killed_at = _logged_lines(workdir)
    assert killed_at < STEPS, "the run finished before the kill"
    out = _finish(workdir, devices, mesh)
    resumed_from = _resumed_step(out)
    assert resumed_from is not None and resumed_from % EVERY == 0 and 0 < resumed_from <= killed_at, out[-2000:]
    _assert_same_run(_metrics(workdir), reference.records())
    # The restarted process itself re-logged every step after its checkpoint, identically.
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == killed_at + (STEPS - resumed_from)


def test_kill_during_training_resumes_exactly(tmp_path, reference):
    _kill_during_training_and_resume(tmp_path, reference)


@pytest.mark.slow
def test_kill_during_training_resumes_exactly_on_8_devices(tmp_path, reference):
    """The same with the state sharded over (fsdp=2, expert=2, model=2) on 8 emulated devices: Orbax
    saves and restores the shards; the resumed run equals the uninterrupted 8-device run bitwise, and
    the 1-device run to float32 reduction-order rounding."""
    mesh = {"data": 1, "fsdp": 2, "expert": 2, "model": 2}
    sharded = _Reference(tmp_path / "uninterrupted", devices=8, mesh=mesh)
    _kill_during_training_and_resume(tmp_path / "killed", sharded, devices=8, mesh=mesh)
    one_device = np.array([r["loss"] for r in reference.records()])
    eight = np.array([r["loss"] for r in sharded.records()])
    np.testing.assert_allclose(eight, one_device, rtol=1e-4)


def test_kill_during_checkpoint_save_resumes_exactly(tmp_path, reference):
    """SIGKILL the moment a save's temporary folder appears (Orbax writes `<step>.orbax-checkpoint-tmp*`
    and renames it when complete), twice, each time at a later save (never the first one, so some
    checkpoint is complete); the unfinished save must never
    be picked up, and the final losses must equal the uninterrupted run's."""
    from ling_jax.train.checkpointing import Checkpointer

    kills_mid_save, latest = 0, 0
    for _ in range(2):
        proc = _start(tmp_path)
        deadline = time.monotonic() + 300
        victim = None
        while victim is None:
            assert proc.poll() is None, _ended(proc)
            assert time.monotonic() < deadline, "no checkpoint save seen"
            for name in _checkpoint_entries(tmp_path):
                m = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", name)
                # A save this process makes (not a leftover), after at least one complete one.
                if m and int(m.group(1)) > latest + EVERY:
                    victim = (int(m.group(1)), name)
            if victim is None:
                time.sleep(0.001)
        out = _kill(proc)
        assert _resumed_step(out) == (latest or None), out[-2000:]
        step, tmp_name = victim
        leftovers = [n for n in _checkpoint_entries(tmp_path) if "tmp" in n]
        kills_mid_save += tmp_name in leftovers
        # Whatever was left behind, only complete checkpoints are listed.
        checkpointer = Checkpointer(tmp_path / "checkpoints", keep=KEEP, async_save=False)
        complete = checkpointer.all_steps()
        checkpointer.close()
        assert complete, "no complete checkpoint"
        assert tmp_name not in leftovers or step not in complete, (step, complete, leftovers)
        latest = max(complete)
    assert kills_mid_save >= 1, "no kill landed while a save was in progress"
    out = _finish(tmp_path)
    assert _resumed_step(out) == latest, out[-2000:]
    _assert_same_run(_metrics(tmp_path), reference.records())


@pytest.mark.slow
def test_restarting_a_finished_run_is_a_no_op(tmp_path, reference):
    """A finished run resumes from its final checkpoint, trains no further step, logs nothing more."""
    _finish(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    out = _finish(tmp_path)
    assert _resumed_step(out) == STEPS, out[-2000:]
    assert (tmp_path / "metrics.jsonl").read_text() == before
    _assert_same_run(_metrics(tmp_path), reference.records())


# --------------------------------------------------------------------------- the run directory's rules
def _experiment(**train):
    from multidevice.common import small_experiment

    return small_experiment(train={"steps": 10, **train})


def _fresh_run_dir(workdir: Path, exp) -> None:
    from ling_jax.train import run_dir

    prepared = run_dir.prepare(workdir, exp)
    run_dir.write_config(workdir, exp, prepared.changes, allowed_by_flag=False, step=None)
    prepared.lock.release()


def test_resume_with_other_settings_is_refused_and_writes_nothing(tmp_path):
    from ling_jax.train import run_dir

    _fresh_run_dir(tmp_path, _experiment())
    before = (tmp_path / "config.json").read_bytes()
    changed = _experiment(learning_rate=1e-3, seed=3)
    with pytest.raises(run_dir.RunDirError) as e:
        run_dir.prepare(tmp_path, changed)
    assert "train.learning_rate: 0.003 -> 0.001" in str(e.value) and "train.seed: 0 -> 3" in str(e.value)
    assert "--allow_config_change" in str(e.value)
    assert (tmp_path / "config.json").read_bytes() == before
    assert not (tmp_path / "config_changes.jsonl").exists()


def test_allowed_config_change_is_recorded(tmp_path):
    import json

    from ling_jax.train import run_dir

    _fresh_run_dir(tmp_path, _experiment())
    changed = _experiment(learning_rate=1e-3, steps=20)
    prepared = run_dir.prepare(tmp_path, changed, allow_change=True)
    run_dir.write_config(tmp_path, changed, prepared.changes, allowed_by_flag=True, step=5)
    prepared.lock.release()
    record = json.loads((tmp_path / "config_changes.jsonl").read_text())
    assert record["allow_config_change"] and record["resumed_at_step"] == 5
    assert {c["field"]: (c["old"], c["new"]) for c in record["changes"]} == {
        "train.learning_rate": (0.003, 0.001),
        "train.steps": (10, 20),
    }
    assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.001


def test_run_time_settings_may_change_freely(tmp_path):
    from ling_jax.train import run_dir

    _fresh_run_dir(tmp_path, _experiment())
    prepared = run_dir.prepare(tmp_path, _experiment(steps=30, log_every=5, sample_tokens=3))
    prepared.lock.release()
    assert sorted(c[0] for c in prepared.changes) == ["train.log_every", "train.sample_tokens", "train.steps"]


def test_foreign_directories_are_refused_untouched(tmp_path):
    import json

    from ling_jax.train import run_dir

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bailing_moe_v2", "hidden_size": 32}))
    with pytest.raises(run_dir.RunDirError, match="not a ling-jax run's .a Hugging Face checkpoint"):
        run_dir.prepare(hf, _experiment())
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(run_dir.RunDirError, match=r"is not empty and is not a ling-jax run directory .*notes.txt"):
        run_dir.prepare(other, _experiment())
    assert sorted(p.name for p in hf.iterdir()) == ["config.json"]
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_second_process_is_refused_by_the_lock(tmp_path):
    from ling_jax.train import run_dir

    exp = _experiment()
    held = run_dir.prepare(tmp_path, exp)
    with pytest.raises(run_dir.RunDirError, match=rf"is in use: process {os.getpid()} is training into it"):
        run_dir.prepare(tmp_path, exp)
    held.lock.release()
    run_dir.prepare(tmp_path, exp).lock.release()  # free again once released


def test_uncreatable_checkpoint_directory_is_refused_at_start(tmp_path):
    from ling_jax.train import run_dir

    _fresh_run_dir(tmp_path, _experiment())
    import shutil

    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").write_text("a file")
    with pytest.raises(run_dir.RunDirError, match="checkpoints exists and is not a directory"):
        run_dir.prepare(tmp_path, _experiment())


def test_allowed_change_of_the_state_shapes_is_still_refused():
    """model.hidden_size 32 -> 48 with --allow_config_change: the checkpoints cannot be restored, and
    must not be taken for damaged ones; refused before any restore."""
    import flax.linen as nn
    import jax
    from multidevice.common import small_experiment

    from ling_jax.train import run_dir
    from ling_jax.train.state import init_state, make_optimizer

    def abstract(exp):
        return nn.unbox(jax.eval_shape(lambda: init_state(exp.model, make_optimizer(exp.train), jax.random.key(0))))

    stored = run_dir.experiment_to_dict(_experiment())
    run_dir.check_same_state_layout(stored, abstract(_experiment(learning_rate=1e-3)))  # same shapes: fine
    with pytest.raises(
        run_dir.RunDirError,
        match=r"change the train state .*params.*k_proj.*\(1, 32, 2, 8\) float32 -> \(1, 48, 2, 8\) float32",
    ):
        run_dir.check_same_state_layout(stored, abstract(small_experiment(model={"hidden_size": 48})))
