"""What the training-system tests share: a model much smaller than configs/tiny.py (so a compile
takes seconds, not minutes), small data, and the environment for `ling-jax` subprocesses.

Importable from test files as `multidevice.common` (pytest puts tests/ on sys.path) and from the
helper scripts in this folder as `common`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# 2 layers (1 dense + 1 MoE) + 1 MTP layer; 8 experts top-2 in 4 groups (keep 2), a shared expert,
# GQA 4/2: every code path of the full model, at a size that compiles in seconds.
SMALL_MODEL = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    num_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    num_mtp_layers=1,
    max_position_embeddings=64,
)
# peak_flops_per_device: a nominal MFU denominator, so runs skip measuring the matmul peak.
SMALL_TRAIN = dict(
    batch_size=8, seq_len=32, warmup_steps=2, log_every=1, sample_tokens=8, eval_batches=2, peak_flops_per_device=1e11
)
SMALL_DATA = dict(max_tokens=50_000)

# XLA:CPU's LLVM backend at -O0 compiles 2-3x faster; HLO passes and float semantics are unchanged
# (see tests/conftest.py). Every run a test compares against another uses the same flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# One persistent XLA compilation cache for every subprocess of a pytest session: runs of the same
# config (an uninterrupted run and its killed-and-restarted twin) compile once. A cached executable
# is the same binary, so results are bitwise those of a fresh compile.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="ling-jax-test-xla-cache-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)


def small_config(model=None, train=None, data=None, checkpoint=None, mesh=None):
    """configs/tiny.py with the small model/train/data settings above, then the given changes."""
    sys.path.insert(0, str(REPO_ROOT))
    from configs.tiny import get_config

    config = get_config()
    config.model.update({**SMALL_MODEL, **(model or {})})
    config.train.update({**SMALL_TRAIN, **(train or {})})
    config.data.update({**SMALL_DATA, **(data or {})})
    config.checkpoint.update(checkpoint or {})
    config.mesh.update(mesh or {})
    return config


def small_experiment(**sections):
    from ling_jax.train.config import experiment_from_config

    return experiment_from_config(small_config(**sections))


def config_flags(model=None, train=None, data=None, checkpoint=None, mesh=None) -> list[str]:
    """`--config.section.key=value` flags for `ling-jax train` giving `small_config(...)`."""
    flags = []
    for section, base, changes in (
        ("model", SMALL_MODEL, model),
        ("train", SMALL_TRAIN, train),
        ("data", SMALL_DATA, data),
        ("checkpoint", {}, checkpoint),
        ("mesh", {}, mesh),
    ):
        for key, value in {**base, **(changes or {})}.items():
            flags.append(f"--config.{section}.{key}={value}")
    return flags


def subprocess_env(num_devices: int = 1, fast_compile: bool = True) -> dict:
    """Environment for a JAX subprocess: CPU only, `num_devices` emulated host devices."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    if fast_compile:
        flags += FAST_COMPILE_FLAGS.split()
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"  # a killed run's output up to the kill is still readable
    return env


def cli(*args: str) -> list[str]:
    """argv of `ling-jax ARGS` run with this interpreter."""
    return [PYTHON, "-m", "ling_jax.cli", *args]


def start_cli(
    *args: str,
    num_devices: int = 1,
    env: dict | None = None,
    program: list[str] | None = None,
    fast_compile: bool = True,
):
    """Starts `ling-jax ARGS` (or `program ARGS`) in the background; see `finish_cli`. `fast_compile`:
    the suite's fast-compile XLA flags (False: XLA's default optimisation, as a user runs it)."""
    return subprocess.Popen(
        (program or cli())[:] + list(args),
        env={**subprocess_env(num_devices, fast_compile), **(env or {})},
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_cli(proc: subprocess.Popen, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Waits for a `start_cli` process. With `check`, a non-zero exit fails showing both streams."""
    out, err = proc.communicate(timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args[2:4]))} exited {proc.returncode}\n--- stdout\n"
            f"{out[-4000:]}\n--- stderr\n{err[-4000:]}"
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(
    *args: str,
    num_devices: int = 1,
    timeout: float = 900,
    check: bool = True,
    env: dict | None = None,
    fast_compile: bool = True,
):
    """Runs `ling-jax ARGS` to completion; returns the CompletedProcess (stdout and stderr as text)."""
    proc = start_cli(*args, num_devices=num_devices, env=env, fast_compile=fast_compile)
    return finish_cli(proc, timeout=timeout, check=check)


def train_args(workdir, *extra: str, model=None, train=None, data=None, checkpoint=None, mesh=None) -> list[str]:
    """Arguments of `ling-jax train --workdir WORKDIR` on the small config with the given changes."""
    flags = config_flags(model=model, train=train, data=data, checkpoint=checkpoint, mesh=mesh)
    return ["train", "--workdir", str(workdir), "--noprogress", *flags, *extra]


def train_cli(workdir, *extra: str, model=None, train=None, data=None, checkpoint=None, mesh=None, **kwargs):
    """Runs `ling-jax train --workdir WORKDIR` on the small config with the given changes."""
    args = train_args(workdir, *extra, model=model, train=train, data=data, checkpoint=checkpoint, mesh=mesh)
    return run_cli(*args, **kwargs)


def start_run_steps(spec: dict, num_devices: int = 1) -> subprocess.Popen:
    """Starts tests/multidevice/run_steps.py SPEC in the background (see `finish_run_steps`)."""
    import json

    return subprocess.Popen(
        [PYTHON, str(REPO_ROOT / "tests" / "multidevice" / "run_steps.py"), json.dumps(spec)],
        env=subprocess_env(num_devices),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_run_steps(proc: subprocess.Popen, timeout: float = 1800) -> dict:
    """Waits for a `start_run_steps` process; returns its JSON result."""
    import json

    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-5000:]
    return json.loads(out.strip().splitlines()[-1])
