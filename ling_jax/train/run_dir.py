"""A run directory written by `ling-jax train`: its experiment, its checkpoints, and the rules that
keep it whole.

WORKDIR holds config.json (the experiment), checkpoints/, metrics.jsonl, tensorboard/,
loss_curve.png, config_changes.jsonl (every accepted change of settings on a resume), quarantine/
(checkpoints found unusable) and .lock-process-<i> (held by the training process i while it runs).

Before a run touches anything:
- a directory that is not a ling-jax run (a config.json without our sections, e.g. a Hugging Face
  checkpoint, or no config.json and files other than a run's own) is refused;
- an exclusive `flock` on the lock file is taken, held for the process's life (the kernel releases
  it when the process ends, however it ends); a second training process is refused;
- the experiment is compared with the stored config.json: a resume that changes a setting which
  affects the numbers is refused naming each differing field, unless `allow_change` is given; then
  the change is appended to config_changes.jsonl (a change of the train state's shapes is refused
  even then: those checkpoints cannot be resumed). Settings that only say how long, how often or
  where (train.steps, logging, evaluation, sampling, checkpoint cadence, the mesh, remat) may change
  freely and are recorded too. A refused run writes nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import time
from pathlib import Path

import flax.linen as nn
import jax

from ling_jax.sharding import build_mesh
from ling_jax.train.checkpointing import QUARANTINE, Checkpointer
from ling_jax.train.config import Experiment, experiment_from_config
from ling_jax.train.state import init_state, make_optimizer, state_shardings

CONFIG = "config.json"
CONFIG_CHANGES = "config_changes.jsonl"
CHECKPOINTS = "checkpoints"
SECTIONS = ("model", "data", "train", "checkpoint", "mesh")
# Names a ling-jax run writes into WORKDIR; anything else in a directory without config.json is foreign.
OWN_NAMES = {CONFIG, CONFIG_CHANGES, CHECKPOINTS, QUARANTINE, "metrics.jsonl", "tensorboard", "loss_curve.png"}
LOCK_PREFIX = ".lock-process-"
# Fields that do not change what the run computes: how long, how often, where. Free on a resume.
FREE_FIELDS = {
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.max_nonfinite_steps",
    "train.peak_flops_per_device",
    "train.sample_tokens",
    "train.sample_prompt",
    "train.sample_temperature",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
    "model.remat_policy",
}
FREE_SECTIONS = {"mesh"}


class RunDirError(RuntimeError):
    """WORKDIR cannot be used for this run; the message is one line for the user."""


def experiment_to_dict(exp: Experiment) -> dict:
    """The experiment as config.json stores it (JSON types: tuples become lists)."""
    raw = {name: dataclasses.asdict(getattr(exp, name)) for name in SECTIONS}
    return json.loads(json.dumps(raw))


def load_experiment(workdir: Path) -> Experiment:
    path = Path(workdir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a ling-jax run directory: no config.json")
    return experiment_from_config(json.loads(path.read_text()))


def checkpointer_for(workdir: Path, exp: Experiment) -> Checkpointer:
    return Checkpointer(Path(workdir) / CHECKPOINTS, keep=max(exp.checkpoint.keep, 1), async_save=False)


def restore(workdir: Path, exp: Experiment, step: int | None = None, mesh=None):
    """(state, data iterator state, step, mesh, shardings) of checkpoint `step` (default: latest),
    verified (CorruptCheckpoint when it is damaged)."""
    checkpointer = checkpointer_for(workdir, exp)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {Path(workdir) / CHECKPOINTS}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {workdir}; available: {steps}")
    mesh = mesh or build_mesh(exp.mesh.axes)
    abstract, shardings = state_shardings(exp.model, make_optimizer(exp.train), mesh)
    try:
        state, data_state = checkpointer.restore(step, abstract, shardings)
    finally:
        checkpointer.close()
    return state, data_state, step, mesh, shardings


# --------------------------------------------------------------------------- before a run starts
def _stored_config(workdir: Path) -> dict | None:
    """The run's stored config.json, None for a fresh directory; RunDirError for a foreign one."""
    path = workdir / CONFIG
    if not workdir.exists():
        return None
    if not workdir.is_dir():
        raise RunDirError(f"--workdir {workdir} is a file, not a directory")
    if not path.exists():
        # Our own names without config.json: a run that stopped before its first check passed.
        foreign = sorted(p.name for p in workdir.iterdir() if p.name not in OWN_NAMES and not _is_lock(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise RunDirError(
                f"--workdir {workdir} is not empty and is not a ling-jax run directory (no {CONFIG}; holds "
                f"{shown}); train into a new or empty directory"
            )
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read as JSON ({e}); not a ling-jax run directory") from e
    if not isinstance(stored, dict) or not set(SECTIONS) <= set(stored):
        kind = f" (a Hugging Face checkpoint: model_type={stored['model_type']!r})" if "model_type" in stored else ""
        raise RunDirError(
            f"--workdir {workdir} holds a {CONFIG} that is not a ling-jax run's{kind}; "
            "train into a new or empty directory"
        )
    return stored


def _is_lock(name: str) -> bool:
    return name.startswith(LOCK_PREFIX)


def config_diff(stored: dict, new: dict) -> list[tuple[str, object, object]]:
    """(section.field, stored value, new value) for every field that differs."""
    diffs = []
    for section in SECTIONS:
        old_s, new_s = stored.get(section, {}), new.get(section, {})
        for key in sorted(set(old_s) | set(new_s)):
            old_v, new_v = old_s.get(key, "<absent>"), new_s.get(key, "<absent>")
            if old_v != new_v:
                diffs.append((f"{section}.{key}", old_v, new_v))
    return diffs


def _is_free(field: str) -> bool:
    return field in FREE_FIELDS or field.split(".")[0] in FREE_SECTIONS


class RunLock:
    """An exclusive flock on WORKDIR/.lock-process-<index>, held until `release` or process exit."""

    def __init__(self, workdir: Path, process_index: int = 0):
        self.path = workdir / f"{LOCK_PREFIX}{process_index}"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            os.close(self._fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock {self.path}: {e}") from e
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise RunDirError(
                f"--workdir {workdir} is in use: {who} is training into it (lock {self.path}); "
                "wait for it to finish or use another --workdir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


@dataclasses.dataclass
class PreparedRunDir:
    lock: RunLock
    changes: list[tuple[str, object, object]]  # differences from the stored config (empty when fresh or same)
    stored: dict | None  # the stored config.json, None for a fresh directory


def prepare(workdir: Path, exp: Experiment, *, allow_change: bool = False, process_index: int = 0) -> PreparedRunDir:
    """Checks WORKDIR for this run and locks it; writes nothing but the lock file (see the module
    docstring). Raises RunDirError with one line for the user."""
    workdir = Path(workdir)
    _stored_config(workdir)  # refuse a foreign directory before creating anything in it
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create --workdir {workdir}: {e.strerror}") from e
    lock = RunLock(workdir, process_index)
    try:
        stored = _stored_config(workdir)  # again, under the lock
        changes = [] if stored is None else config_diff(stored, experiment_to_dict(exp))
        fixed = [c for c in changes if not _is_free(c[0])]
        if fixed and not allow_change:
            listed = "; ".join(f"{f}: {json.dumps(a)} -> {json.dumps(b)}" for f, a, b in fixed)
            raise RunDirError(
                f"--workdir {workdir} holds a run with other settings ({listed}); resuming would mix two "
                "runs. Use another --workdir, or pass --allow_config_change to resume with the new settings "
                f"(recorded in {CONFIG_CHANGES})"
            )
        check_checkpoint_dir(workdir / CHECKPOINTS)
    except BaseException:
        lock.release()
        raise
    return PreparedRunDir(lock, changes, stored)


def check_checkpoint_dir(path: Path) -> None:
    """The checkpoints folder exists (or can be created) and is writable."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"cannot write checkpoints: {path} exists and is not a directory")
    try:
        path.mkdir(exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write checkpoints to {path}: {e.strerror or e}") from e


def write_config(workdir: Path, exp: Experiment, changes: list, *, allowed_by_flag: bool, step: int | None) -> None:
    """Writes config.json (atomically: a temporary file renamed) and records `changes`."""
    workdir = Path(workdir)
    if changes:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_at_step": step,
            "allow_config_change": allowed_by_flag,
            "changes": [{"field": f, "old": a, "new": b} for f, a, b in changes],
        }
        with open(workdir / CONFIG_CHANGES, "a") as f:
            f.write(json.dumps(record) + "\n")
    tmp = workdir / f".{CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(experiment_to_dict(exp), indent=2) + "\n")
    os.replace(tmp, workdir / CONFIG)


def check_same_state_layout(stored: dict, new_abstract) -> None:
    """RunDirError when the stored run's train state has other leaves, shapes or dtypes than the new
    experiment's (e.g. an allowed change of model.hidden_size): its checkpoints cannot be resumed,
    and they are not damaged either."""
    try:
        old = experiment_from_config(stored)
    except Exception as e:  # a config.json from another version: say so instead of guessing
        raise RunDirError(f"the stored {CONFIG} cannot be read as an experiment: {e}") from e
    old_abstract = nn.unbox(jax.eval_shape(lambda: init_state(old.model, make_optimizer(old.train), jax.random.key(0))))

    def layout(tree) -> dict[str, tuple]:
        return {jax.tree_util.keystr(p): (x.shape, str(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    before, after = layout(old_abstract), layout(new_abstract)
    if before != after:
        differ = sorted(
            (k for k in before.keys() | after.keys() if before.get(k) != after.get(k)),
            key=lambda k: (not k.startswith(".params"), k),  # parameters first: they name the cause
        )

        def show(entry) -> str:
            return "absent" if entry is None else f"{entry[0]} {entry[1]}"

        shown = "; ".join(f"{k}: {show(before.get(k))} -> {show(after.get(k))}" for k in differ[:2])
        raise RunDirError(
            f"the changed settings change the train state ({len(differ)} leaves differ, e.g. {shown}): the "
            "checkpoints cannot be resumed with them; train into a new --workdir"
        )
