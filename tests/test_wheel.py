"""The package as users install it: a wheel built from the source tree, installed (not editable) into
a fresh virtualenv outside the tree, runs `ling-jax params --config tiny` and a 5-step `ling-jax
train` with the presets packaged inside it.

The fresh venv installs only the wheel (`--no-deps`); its third-party dependencies (jax, flax, ...)
come from this interpreter's site-packages through a .pth file appended after its own, so nothing is
downloaded. The editable ling_jax of the development venv is not on that path (its finder is a .pth
hook, and .pth files of an appended directory are not run); the test checks which ling_jax runs.
The C++ CPU kernel is built by setup.py as any install builds it (optional: skipped without a compiler).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from multidevice.common import FAST_COMPILE_FLAGS

IGNORED = (".git", ".venv*", "build", "dist", "__pycache__", "*.egg-info", "*.so", ".pytest_cache", "runs", "notebooks")


def _source_files(root: Path) -> list[str]:
    """The tree's tracked and untracked-but-not-ignored files (git), else everything but IGNORED."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
        )
        return [f for f in out.stdout.decode().split("\0") if f and (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return []


def _copy_source(dst: Path) -> None:
    files = _source_files(REPO_ROOT)
    if not files:
        shutil.copytree(REPO_ROOT, dst, ignore=shutil.ignore_patterns(*IGNORED))
        return
    for f in files:
        if f.startswith("notebooks/"):
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / f, dst / f)


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, environment, working dir outside the source tree) with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = root / "src", root / "dist", root / "venv", root / "work"
    work.mkdir()
    _copy_source(src)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src])
    (wheel,) = dist.glob("ling_jax-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours) if Path(p).is_dir()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)
    where = _run(
        [python, "-c", "import ling_jax, ling_jax.configs as c; print(ling_jax.__file__, c.path('tiny'))"],
        cwd=work,
        env=env,
    )
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"imported {path}, not the installed wheel"
    return venv / "bin", env, work


def test_params_from_the_wheel(installed):
    bin_dir, env, work = installed
    proc = _run([bin_dir / "ling-jax", "params", "--config", "tiny"], cwd=work, env=env)
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    from ling_jax import configs, count_params

    assert counts["total"] == count_params(configs.model_config("tiny")).total


def test_train_from_the_wheel(installed):
    bin_dir, env, work = installed
    overrides = dict(steps=5, batch_size=4, seq_len=64, peak_flops_per_device=1e11, sample_tokens=8, eval_batches=1)
    args = [f"--config.train.{k}={v}" for k, v in overrides.items()] + ["--config.data.max_tokens=50000"]
    proc = _run(
        [bin_dir / "ling-jax", "train", "--config", "tiny", *args, "--workdir", work / "run", "--noprogress"],
        cwd=work,
        env=env,
    )
    assert "final step 5:" in proc.stdout
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in records) == 5
    assert any((work / "run" / "checkpoints").iterdir())
