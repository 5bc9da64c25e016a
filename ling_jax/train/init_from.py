"""Start a stage from earlier weights: `load_init_variables(path, cfg) -> {"params", "expert_bias"}`.

`path` is either
- a ling-jax run directory (config.json of ours + checkpoints/): the newest checkpoint that restores
  and passes the verified restore of ling_jax/train/checkpointing.py (Orbax's checks, fingerprints,
  finiteness); a damaged newer one is skipped with a warning naming it (it is not moved: the source
  run is only read). Its params and expert biases are taken; its optimizer state is not.
- a Hugging Face BailingMoeV2 checkpoint directory (config.json with model_type, safetensors),
  read with `ling_jax.hf.load_checkpoint`.

The source's model must be the one `cfg` describes: every field that shapes or defines the
computation (sizes, routing, RoPE, norms, special ids) must be equal, else `InitError` names the
fields with both values. Fields that only say how to compute (`RUNTIME_FIELDS`: dtypes, remat,
dispatch and kernel choices, FP8, the init scale and the MTP loss weight) may differ. Leaves are
returned as host numpy arrays in `cfg`'s parameter dtype; the caller places them (the training
loop puts them on its state's shardings).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from ling_jax.config import ModelConfig

# ModelConfig fields that do not change the parameters or what they compute.
RUNTIME_FIELDS = frozenset(
    {
        "dtype",
        "param_dtype",
        "scan_layers",
        "remat_policy",
        "moe_dispatch",
        "moe_capacity_factor",
        "fp8",
        "router_impl",
        "attention_impl",
        "init_std",
        "mtp_loss_weight",
    }
)


class InitError(ValueError):
    """The init weights cannot be used for this model; one line naming the path and the problem."""


def model_mismatches(source: ModelConfig, target: ModelConfig) -> list[str]:
    """ "model.field: source -> target" for every non-runtime field that differs."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in RUNTIME_FIELDS:
            continue
        a, b = getattr(source, f.name), getattr(target, f.name)
        if a != b:
            out.append(f"model.{f.name}: {a!r} -> {b!r}")
    return out


def _is_run_dir(path: Path) -> bool:
    try:
        stored = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and {"model", "train"} <= set(stored)


def _from_run_dir(path: Path, cfg: ModelConfig) -> tuple[ModelConfig, dict]:
    from ling_jax.sharding import build_mesh
    from ling_jax.train.checkpointing import CorruptCheckpoint
    from ling_jax.train.run_dir import checkpointer_for, load_experiment
    from ling_jax.train.state import make_optimizer, state_shardings

    exp = load_experiment(path)
    mismatched = model_mismatches(exp.model, cfg)
    if mismatched:  # before reading any checkpoint
        raise InitError(f"--init {path}: its model differs from this run's ({'; '.join(mismatched)})")
    checkpointer = checkpointer_for(path, exp)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise InitError(f"--init {path}: no complete checkpoint in {path / 'checkpoints'}")
        # One device's replicated copy: the caller re-places the leaves on its own mesh.
        mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "model": 1}, devices=jax.devices()[:1])
        abstract, shardings = state_shardings(exp.model, make_optimizer(exp.train), mesh)
        bad = []
        for step in reversed(steps):
            try:
                state, _ = checkpointer.restore(step, abstract, shardings)
            except CorruptCheckpoint as e:
                print(f"ling-jax: warning: --init {path}: {e}; trying the previous checkpoint", file=sys.stderr)
                bad.append(step)
                continue
            variables = {"params": state.params, "expert_bias": state.expert_bias}
            return exp.model, jax.device_get(variables)
        raise InitError(f"--init {path}: every checkpoint failed verification (steps {bad})")
    finally:
        checkpointer.close()


def _from_hf_dir(path: Path, cfg: ModelConfig) -> tuple[ModelConfig, dict]:
    from ling_jax import hf

    try:
        source, variables = hf.load_checkpoint(path, scan_layers=cfg.scan_layers)
    except Exception as e:
        raise InitError(f"--init {path}: cannot read the Hugging Face checkpoint: {e}") from e
    mismatched = model_mismatches(source, cfg)
    if mismatched:
        raise InitError(f"--init {path}: its model differs from this run's ({'; '.join(mismatched)})")
    return source, variables


def load_init_variables(path: str | Path, cfg: ModelConfig) -> dict:
    """{"params", "expert_bias"} of a run directory's newest good checkpoint or of an HF
    checkpoint directory (see the module docstring); InitError for anything unusable."""
    path = Path(path)
    if not path.is_dir():
        raise InitError(f"--init {path}: not a directory (a ling-jax run directory or a Hugging Face checkpoint)")
    if _is_run_dir(path):
        _, variables = _from_run_dir(path, cfg)
    elif (path / "config.json").is_file():
        _, variables = _from_hf_dir(path, cfg)
    else:
        raise InitError(
            f"--init {path}: neither a ling-jax run directory nor a Hugging Face checkpoint (no config.json)"
        )
    dtype = np.dtype(cfg.jnp_param_dtype)
    return {
        "params": jax.tree.map(lambda x: np.asarray(x, dtype), variables["params"]),
        "expert_bias": jax.tree.map(lambda x: np.asarray(x, np.float32), variables.get("expert_bias", {})),
    }
