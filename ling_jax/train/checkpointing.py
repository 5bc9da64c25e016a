"""Orbax checkpoints of the whole run: train state (params, optimizer, expert biases, counters)
and the data iterator's state. Saves are asynchronous and atomic (Orbax writes a temporary
directory and renames it when complete), so a run killed at any point — during a save too —
resumes from the last complete checkpoint.

Integrity: each checkpoint carries a third item, `integrity`, written with the others: a fingerprint
of every state leaf (two wrapping uint32 sums of its bits, computed on device, exact for any
sharding; any single flipped bit changes the first) and a SHA-256 of the data iterator state. A
restore checks Orbax's own errors, the fingerprints and that every float leaf is finite, and raises
`CorruptCheckpoint` naming the step and the reason. A non-finite state is never saved.

A checkpoint found unusable is moved (never deleted) to WORKDIR/quarantine/<step>[.N]: left in
place it would still be the newest step, and Orbax skips every save at or below the newest step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

QUARANTINE = "quarantine"  # beside the checkpoints folder: where unusable checkpoints are moved


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message is one line for the user."""


class CorruptCheckpoint(CheckpointError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is unusable: {reason}")
        self.path, self.reason = path, reason


_OS_CAUSES = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)]


def _first_line(error: BaseException) -> str:
    """The first line of the error's root cause (Orbax wraps TensorStore's, which names the file),
    shortened, with its operating-system cause (e.g. a full disk) kept."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    full = str(error).strip()
    line = f"{type(error).__name__}: {full.splitlines()[0] if full else ''}"
    if len(line) > 300:
        line = line[:300] + " ..."
    cause = next((c for c in _OS_CAUSES if c in full), None)
    return f"{line} ({cause})" if cause and cause not in line else line


def _quiet_abandoned_coroutines() -> None:
    """After a failed save or restore, Orbax's abandoned coroutines warn when collected; the
    CheckpointError raised says it all."""
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


def _is_closed_loop_error(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_closed_loop_callbacks() -> None:
    """When a save or restore fails part-way, TensorStore operations still in flight complete after
    Orbax has closed its asyncio loop; each of their callbacks reports a harmless "RuntimeError: Event loop
    is closed" traceback (from TensorStore's threads, through sys.unraisablehook or sys.excepthook,
    often before the failure's own error arrives). Drop those, and only those (and the same failure
    reported again by Orbax's abandoned read coroutines), for the rest of the process."""
    if getattr(sys.unraisablehook, "ling_jax_quiet", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(info):
        # Orbax's read coroutines abandoned by the failed restore also report their errors when
        # they are garbage-collected.
        code = getattr(info.object, "cr_code", None)
        from_orbax = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (_is_closed_loop_error(info.exc_value) or from_orbax):
            previous_unraisable(info)

    def excepthook(kind, value, tb):
        if not _is_closed_loop_error(value):
            previous_except(kind, value, tb)

    unraisable.ling_jax_quiet = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


_DIRECTORIES: set[str] = set()  # checkpoint folders of this process's Checkpointers


def _raised_in_orbax(record: logging.LogRecord) -> bool:
    """Raised in Orbax's code, or a TensorStore error about one of our checkpoint folders."""
    message = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    if "orbax" in message or any(d in message for d in _DIRECTORIES):
        return True
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _QuietOrbaxErrors(logging.Filter):
    """Drops the error records (each with a traceback, often several per failure) that Orbax logs
    from its background threads when a save or restore fails: the failure reaches the caller as one
    CheckpointError line instead. LING_JAX_DEBUG=1 keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or os.environ.get("LING_JAX_DEBUG", "").strip().lower() in (
            "1",
            "true",
            "yes",
            "on",
        ):
            return True
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        # asyncio's "... exception was never retrieved" for Orbax's own abandoned tasks
        return not (record.name == "asyncio" and _raised_in_orbax(record))


_QUIET = _QuietOrbaxErrors()


def _quiet_orbax_errors() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The leaf's bit patterns as uint32 (floats bitcast, narrower types widened)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        width = {2: jnp.uint16, 4: jnp.uint32, 1: jnp.uint8}.get(x.dtype.itemsize)
        if width is None:
            raise TypeError(f"cannot fingerprint a {x.dtype} leaf")
        x = jax.lax.bitcast_convert_type(x, width)
    return x.astype(jnp.uint32)


@jax.jit
def state_summary(state) -> tuple[list[jax.Array], jax.Array]:
    """([2] uint32 fingerprint per leaf, all float leaves finite) of a state, on device.

    Integer arithmetic wraps exactly, so the sums do not depend on the sharding or reduction order.
    """
    prints, finite = [], []
    for x in jax.tree.leaves(state):
        bits = _leaf_bits(x).reshape(-1)
        weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        prints.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)]))
        if jnp.issubdtype(x.dtype, jnp.inexact):
            finite.append(jnp.all(jnp.isfinite(x)))
    return prints, jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


def _fingerprints(state) -> tuple[dict[str, list[int]], bool]:
    prints, finite = jax.device_get(state_summary(state))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return {p: [int(v) for v in np.asarray(f)] for p, f in zip(paths, prints)}, bool(finite)


def _data_digest(data_state: dict) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int, async_save: bool = True):
        _quiet_orbax_errors()
        _quiet_closed_loop_callbacks()
        _DIRECTORIES.add(str(Path(directory).absolute()))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "integrity"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        """Starts saving `step` (asynchronously if so configured). Raises CheckpointError for a
        non-finite state, a save Orbax declines, or an earlier asynchronous save that failed."""
        self.check_for_errors()
        data_state = data_state or {}
        prints, finite = _fingerprints(state)
        if not finite:
            raise CheckpointError(f"refusing to save step {step}: the train state holds NaN or Inf values")
        integrity = {"step": step, "state": prints, "data_sha256": _data_digest(data_state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            integrity=ocp.args.JsonSave(integrity),
        )
        try:
            saved = self.manager.save(step, args=args)
        except Exception as e:
            _quiet_abandoned_coroutines()
            raise CheckpointError(f"saving a checkpoint to {self.directory} failed: {_first_line(e)}") from e
        if not saved:
            raise CheckpointError(
                f"checkpoint step {step} was not saved: {self.directory} already holds step {self.latest_step()}"
            )

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """The verified state of `step` placed with `shardings`, and the data iterator state.
        Raises CorruptCheckpoint when Orbax cannot read it or what it reads fails the checks."""
        path = self.path(step)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        has_integrity = (path / "integrity").exists()
        items = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        if has_integrity:
            items["integrity"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files; all mean the same here
            _quiet_abandoned_coroutines()
            raise CorruptCheckpoint(path, _first_line(e)) from e
        state, data = restored.state, restored.data
        prints, finite = _fingerprints(state)
        if not finite:
            raise CorruptCheckpoint(path, "the restored state holds NaN or Inf values")
        if has_integrity:
            integrity = restored.integrity or {}
            expected = integrity.get("state")
            if expected != prints:
                bad = sorted(k for k in prints if (expected or {}).get(k) != prints[k])
                raise CorruptCheckpoint(path, f"restored values differ from those saved ({', '.join(bad[:3])} ...)")
            if integrity.get("data_sha256") != _data_digest(data or {}):
                raise CorruptCheckpoint(path, "the data iterator state differs from the one saved")
        return state, data

    def quarantine(self, step: int) -> Path:
        """Moves checkpoint `step` out of the checkpoints folder (process 0; nothing is deleted)."""
        target_dir = self.directory.parent / QUARANTINE
        target = target_dir / str(step)
        if jax.process_index() == 0:
            target_dir.mkdir(exist_ok=True)
            n = 0
            while target.exists():
                n += 1
                target = target_dir / f"{step}.{n}"
            os.rename(self.path(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ling_jax_quarantine_{step}")
        self.manager.reload()
        return target

    def check_for_errors(self) -> None:
        """Raises CheckpointError if an asynchronous save has failed (does not wait for one running)."""
        # A finished save's error is kept by Orbax's finalize thread and raised by the next wait.
        if not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            _quiet_abandoned_coroutines()
            raise CheckpointError(f"saving a checkpoint to {self.directory} failed: {_first_line(e)}") from e

    def close(self) -> None:
        self.manager.close()
