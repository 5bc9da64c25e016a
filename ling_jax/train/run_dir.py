"""Reading a run directory written by `ling-jax train`: its experiment and its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from ling_jax.sharding import build_mesh
from ling_jax.train.checkpointing import Checkpointer
from ling_jax.train.config import Experiment, experiment_from_config
from ling_jax.train.state import make_optimizer, state_shardings


def load_experiment(workdir: Path) -> Experiment:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a ling-jax run directory: no config.json")
    return experiment_from_config(json.loads(path.read_text()))


def checkpointer_for(workdir: Path, exp: Experiment) -> Checkpointer:
    return Checkpointer(Path(workdir) / "checkpoints", keep=max(exp.checkpoint.keep, 1), async_save=False)


def restore(workdir: Path, exp: Experiment, step: int | None = None, mesh=None):
    """(state, data iterator state, step, mesh, shardings) of checkpoint `step` (default: latest)."""
    checkpointer = checkpointer_for(workdir, exp)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {Path(workdir) / 'checkpoints'}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {workdir}; available: {steps}")
    mesh = mesh or build_mesh(exp.mesh.axes)
    abstract, shardings = state_shardings(exp.model, make_optimizer(exp.train), mesh)
    state, data_state = checkpointer.restore(step, abstract, shardings)
    checkpointer.close()
    return state, data_state, step, mesh, shardings
