"""Faults injected into real `ling-jax train` runs: a SIGKILL during a save, the newest checkpoint
corrupted three ways (a data file deleted, bytes flipped, metadata deleted), a full disk, and two
processes training into one directory. Each time the run either resumes from the newest good
checkpoint and logs exactly the losses of an uninterrupted run, or stops with one clear line;
no file is ever lost.

Runs are subprocesses on the small test model (tests/multidevice/common.py) sharing one XLA
compilation cache; the uninterrupted run and a 9-step prefix run are shared by the whole module.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from multidevice.common import PYTHON, REPO_ROOT, finish_cli, start_cli, train_args

STEPS, EVERY, KEEP, PREFIX = 12, 3, 5, 9
TRAIN = dict(steps=STEPS, sample_tokens=0, eval_batches=1)
RUN = dict(train=TRAIN, checkpoint=dict(every=EVERY, keep=KEEP))


def _args(workdir: Path, steps: int = STEPS) -> list[str]:
    return train_args(workdir, train={**TRAIN, "steps": steps}, checkpoint=RUN["checkpoint"])


def _losses(workdir: Path) -> list[float]:
    from ling_jax.train.metrics_log import read_metrics

    records = read_metrics(Path(workdir) / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def _resumed_step(stdout: str) -> int | None:
    m = re.search(r"resumed from \S+/(\d+)\s", stdout)
    return int(m.group(1)) if m else None


def _one_clear_line(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """The process exited `code` and its stderr ends with one `ling-jax train:` line holding `phrases`."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ling-jax train: "), proc.stderr[-4000:]
    for phrase in phrases:
        assert phrase in last, last
    return last


def _files(workdir: Path) -> dict[Path, bytes]:
    """Every file of a run directory and its bytes (the lock file, which holds the last pid, aside)."""
    return {p: p.read_bytes() for p in Path(workdir).rglob("*") if p.is_file() and not p.name.startswith(".lock")}


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted run ("reference") and a run of the first PREFIX steps ("prefix"), together."""
    ref, prefix = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("prefix")
    procs = {"reference": (ref, start_cli(*_args(ref))), "prefix": (prefix, start_cli(*_args(prefix, PREFIX)))}
    for _, proc in procs.values():
        finish_cli(proc)
    assert _steps(prefix) == [3, 6, 9]
    return {name: workdir for name, (workdir, _) in procs.items()}


@pytest.fixture(scope="module")
def reference_losses(runs) -> list[float]:
    losses = _losses(runs["reference"])
    assert len(losses) == STEPS
    return losses


def _corrupt_missing_file(step_dir: Path) -> None:
    data_files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    data_files[0].unlink()  # the largest data file


def _corrupt_flipped_bytes(step_dir: Path) -> None:
    for path in (step_dir / "state").rglob("d/*"):
        raw = bytearray(path.read_bytes())
        for i in range(len(raw) // 3, len(raw), max(len(raw) // 7, 1)):
            raw[i] ^= 0x10
        path.write_bytes(bytes(raw))


def _corrupt_missing_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _corrupt_data_state(step_dir: Path) -> None:
    """Valid JSON with another position of the data iterator: Orbax reads it; the digest must not match."""
    path = step_dir / "data" / "metadata"
    text = path.read_text()
    assert '"next_index": 9' in text, text
    path.write_text(text.replace('"next_index": 9', '"next_index": 8'))


CORRUPTIONS = [_corrupt_missing_file, _corrupt_flipped_bytes, _corrupt_missing_metadata, _corrupt_data_state]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.removeprefix("_corrupt_"))
def test_corrupt_newest_checkpoint_falls_back(tmp_path, runs, reference_losses, corrupt):
    """The newest checkpoint is damaged: the run warns naming it, moves it to quarantine/ (kept, not
    deleted), resumes from the previous one, and logs exactly the uninterrupted losses."""
    workdir = tmp_path / "run"
    shutil.copytree(runs["prefix"], workdir)
    corrupt(workdir / "checkpoints" / str(PREFIX))
    proc = finish_cli(start_cli(*_args(workdir)), check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert _resumed_step(proc.stdout) == PREFIX - EVERY, proc.stdout[-2000:]
    warning = next(line for line in proc.stderr.splitlines() if "warning" in line)
    assert f"checkpoint {workdir / 'checkpoints' / str(PREFIX)} is unusable" in warning
    assert (workdir / "quarantine" / str(PREFIX) / "state").is_dir()
    assert _losses(workdir) == reference_losses


def test_steps_below_the_newest_checkpoint_are_refused(tmp_path, runs):
    """train.steps below the newest checkpoint would train nothing: a ConfigError, nothing written."""
    workdir = tmp_path / "run"
    shutil.copytree(runs["prefix"], workdir)
    before = _files(workdir)
    proc = finish_cli(start_cli(*_args(workdir, PREFIX - 1)), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"train.steps is {PREFIX - 1}, below the step of the newest checkpoint" in proc.stderr
    assert _files(workdir) == before


def test_resume_with_other_settings_is_refused_through_the_cli(tmp_path, runs):
    """model.hidden_size 32 -> 48 on a resume: refused naming the field; with --allow_config_change
    refused still (the checkpoints cannot hold that state), and not mistaken for damage. Nothing is
    written either time; config.json keeps matching the checkpoints."""
    workdir = tmp_path / "run"
    shutil.copytree(runs["prefix"], workdir)
    before = _files(workdir)
    wider = ["--config.model.hidden_size=48"]
    proc = finish_cli(start_cli(*_args(workdir), *wider), check=False)
    _one_clear_line(proc, 2, "model.hidden_size: 32 -> 48", "--allow_config_change")
    assert _files(workdir) == before
    proc = finish_cli(start_cli(*_args(workdir), *wider, "--allow_config_change"), check=False)
    _one_clear_line(proc, 2, "change the train state", "new --workdir")
    assert _files(workdir) == before and not (workdir / "quarantine").exists()


def test_no_usable_checkpoint_stops_with_one_line(tmp_path, runs):
    workdir = tmp_path / "run"
    shutil.copytree(runs["prefix"], workdir)
    for step in _steps(workdir):
        _corrupt_flipped_bytes(workdir / "checkpoints" / str(step))
    proc = finish_cli(start_cli(*_args(workdir)), check=False)
    _one_clear_line(proc, 4, "no usable checkpoint", "quarantine")
    assert sorted(p.name for p in (workdir / "quarantine").iterdir()) == ["3", "6", "9"]


def test_kill_during_save_resumes_exactly(tmp_path, reference_losses):
    """SIGKILL as soon as a save's temporary folder appears after the first complete checkpoint."""
    proc = start_cli(*_args(tmp_path))
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        names = os.listdir(tmp_path / "checkpoints") if (tmp_path / "checkpoints").is_dir() else []
        if any(re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", n) and int(n.split(".")[0]) > EVERY for n in names):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.communicate(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.skip(f"the run ended (exit {proc.returncode}) before a save could be interrupted")
    out = finish_cli(start_cli(*_args(tmp_path))).stdout
    assert _resumed_step(out) in {EVERY, 2 * EVERY}, out[-2000:]
    assert _losses(tmp_path) == reference_losses


def test_two_processes_on_one_workdir(tmp_path, reference_losses):
    """Started together: one trains (exactly the uninterrupted losses), the other is refused with one
    line naming the holder's pid; metrics.jsonl holds one line per step (no interleaving)."""
    procs = [start_cli(*_args(tmp_path)) for _ in range(2)]
    done = [finish_cli(p, check=False) for p in procs]
    codes = sorted(p.returncode for p in done)
    assert codes == [0, 2], [p.stderr[-3000:] for p in done]
    winner, loser = (procs[0], procs[1]) if done[0].returncode == 0 else (procs[1], procs[0])
    refused = done[procs.index(loser)]
    _one_clear_line(refused, 2, "is in use", f"process {winner.pid}")
    assert _losses(tmp_path) == reference_losses
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == STEPS


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")


def _allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_full_disk_stops_with_one_line_and_resumes(tmp_path, runs, reference_losses):
    """The run dir on a tmpfs with room for about two checkpoints: a save fails (or a metrics write);
    the run stops with one clear line, the complete checkpoints stay, a user file beside the run is
    intact, and with room again the run resumes and logs exactly the uninterrupted losses."""
    prefix = runs["prefix"]
    per_checkpoint = max(_allocated(prefix / "checkpoints" / str(s)) for s in _steps(prefix))
    others = _allocated(prefix) - sum(_allocated(prefix / "checkpoints" / str(s)) for s in _steps(prefix))
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, others + int(2.5 * per_checkpoint))
    try:
        user_file = disk / "notes.txt"
        user_file.write_text("mine\n")
        workdir = disk / "run"
        proc = finish_cli(start_cli(*_args(workdir)), check=False)
        _one_clear_line(proc, 4, "No space left on device", "The newest checkpoint, ")
        complete = _steps(workdir)
        assert complete and max(complete) < STEPS, complete
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        out = finish_cli(start_cli(*_args(workdir))).stdout
        assert _resumed_step(out) == max(complete), out[-2000:]
        assert _losses(workdir) == reference_losses
        assert user_file.read_text() == "mine\n"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_nan_update_is_skipped_never_saved(tmp_path):
    """Finite loss and gradients but NaN updates (tests/multidevice/nan_update_train.py): every update
    is skipped, the run stops after train.max_nonfinite_steps naming the newest checkpoint, and that
    checkpoint holds the initial, finite weights."""
    import numpy as np
    import orbax.checkpoint as ocp

    args = _args(tmp_path, 20)[1:] + ["--config.train.max_nonfinite_steps=4", "--config.checkpoint.every=2"]
    program = [PYTHON, str(REPO_ROOT / "tests" / "multidevice" / "nan_update_train.py")]
    proc = finish_cli(start_cli(*args, program=program), check=False)
    newest = tmp_path / "checkpoints" / "2"  # step 4 stops the run before its save
    _one_clear_line(proc, 3, "4 consecutive steps", "stopped at step 4", f"newest checkpoint, {newest}")
    assert _steps(tmp_path) == [2]
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(newest / "state")
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state)]
    assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))
    assert int(state["skipped_steps"]) == 2 and int(state["nonfinite_streak"]) == 2
