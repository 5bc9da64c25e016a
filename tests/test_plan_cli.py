"""`ling-jax plan` as a user runs it: a bad --topology is one line and exit 2, and the ahead-of-time
compile for a TPU topology on a CPU host prints none of libtpu's start-up noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ling_jax.plan.topology import AOT_LIBTPU_ENV, libtpu_missing_reason, quiet_libtpu_for_aot

REPO = Path(__file__).resolve().parents[1]
LIBTPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname", "Source Location Trace", "E0000")
needs_libtpu = pytest.mark.skipif(
    libtpu_missing_reason() is not None, reason=f"TPU AOT compilation unavailable: {libtpu_missing_reason()}"
)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AOT_LIBTPU_ENV}
    env.pop("JAX_PLATFORMS", None)  # the CLI picks the platform itself
    return {**env, **extra}


def run(args, *, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ling_jax.cli", *args],
        cwd=REPO,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("bad", ["v5p:16x16"])  # parse_topology's cases: tests/test_plan.py
def test_bad_topology_is_one_line_and_exit_2(bad):
    proc = run(["plan", "--config", "configs/tiny.py", "--topology", bad])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"ling-jax plan: --topology: topology {bad!r}"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_quiet_environment_leaves_user_settings_and_tpu_hosts_alone(monkeypatch):
    import ling_jax.plan.topology as topology

    monkeypatch.setattr(topology, "has_local_tpu", lambda: False)
    environ = {"TPU_WORKER_HOSTNAMES": "10.0.0.2"}
    added = quiet_libtpu_for_aot(environ)
    assert environ["TPU_WORKER_HOSTNAMES"] == "10.0.0.2" and "TPU_WORKER_HOSTNAMES" not in added
    assert added == {k: v for k, v in AOT_LIBTPU_ENV.items() if k != "TPU_WORKER_HOSTNAMES"}
    monkeypatch.setattr(topology, "has_local_tpu", lambda: True)
    environ = {}
    assert quiet_libtpu_for_aot(environ) == {} and environ == {}


@needs_libtpu
def test_describing_a_topology_prints_no_libtpu_noise():
    """The part of `plan` that loads libtpu (`topology_devices`), in a fresh process."""
    code = (
        "from ling_jax.plan.topology import parse_topology, topology_devices;"
        "print(len(topology_devices(parse_topology('v5p:2x2x2'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env(JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "8"
    noise = [line for line in proc.stderr.splitlines() if any(n in line for n in LIBTPU_NOISE)]
    assert noise == [], proc.stderr


@pytest.mark.slow
@needs_libtpu
def test_plan_tiny_for_v5p_prints_no_libtpu_noise():
    """The whole command as a user runs it (lowers and compiles the tiny train step: minutes on a busy host)."""
    proc = run(["plan", "--config", "configs/tiny.py", "--topology", "v5p:2x2x2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled train step on mesh" in proc.stdout
    output = proc.stdout + proc.stderr
    assert [line for line in output.splitlines() if any(n in line for n in LIBTPU_NOISE)] == []


def test_search_where_nothing_fits_says_why_per_candidate():
    """Tiny at 262,144 positions with the score-materialising XLA attention: no mesh of 8 devices
    holds even one sequence's scores; every candidate is listed with its reason, exit 1."""
    long = 262144
    proc = run(
        [
            "plan",
            "--config",
            "configs/tiny.py",
            "--topology",
            "v5p:2x2x2",
            "--search",
            "--nocompile",
            "--config.model.attention_impl=xla",
            f"--config.model.max_position_embeddings={long}",
            f"--config.train.seq_len={long}",
        ]
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = proc.stdout
    assert "no mesh fits; why, per candidate" in out and "best mesh: none fits" in out
    lines = out.split("no mesh fits; why, per candidate", 1)[1].splitlines()
    assert any("memory over by" in line and "microbatches=" in line for line in lines)
    assert any("model=4 does not divide num_kv_heads=2" in line for line in lines)
