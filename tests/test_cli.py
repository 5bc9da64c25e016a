"""`ling-jax` errors: one line on stderr naming the problem and a non-zero exit (2: bad flag, config
field or config file; 1: a failure while running), the traceback only with --debug or
LING_JAX_DEBUG=1. Every subprocess here stops before anything is compiled."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_collections
import pytest
from ml_collections.config_flags import config_path
from multidevice.common import REPO_ROOT, subprocess_env

from ling_jax.cli import _unknown_overrides, debug_requested


def _run(*args: str, env: dict | None = None, program: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        (program or [sys.executable, "-m", "ling_jax.cli"]) + list(args),
        env={**subprocess_env(1), "JAX_LOG_COMPILES": "1", **(env or {})},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(proc: subprocess.CompletedProcess, code: int, command: str, *needles: str) -> str:
    shown = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == code, shown
    assert "Traceback" not in proc.stderr, shown
    assert "Compiling" not in proc.stderr, "something was compiled before the error\n" + shown
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"ling-jax {command}: ")]
    assert len(lines) == 1, shown
    for needle in needles:
        assert needle in lines[0], shown
    return lines[0]


@pytest.fixture(scope="module")
def config_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    files = {
        "not_a_config": "def get_config():\n    return 5\n",
        "raises": "def get_config():\n    raise RuntimeError('boom in get_config')\n",
        "syntax": "def get_config(:\n",
    }
    for name, text in files.items():
        (root / f"{name}.py").write_text(text)
    return root


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (["params", "--config", "{root}/missing.py"], 2, ["config file", "missing.py does not exist"]),
        (["params", "--config", "{root}/not_a_config.py"], 2, ["config must be an ml_collections.ConfigDict"]),
        (["params", "--config", "{root}/raises.py"], 2, ["raises.py: RuntimeError: boom in get_config", "--debug"]),
        (["params", "--config", "{root}/syntax.py"], 2, ["syntax.py: SyntaxError"]),
        (["params", "--config.train.learning_rate=nan"], 2, ["train.learning_rate must be a finite number, got nan"]),
        (["params", "--config.train.bogus=1"], 2, ["no such config field: config.train.bogus"]),
        (["eval", "--workdir", "{root}/no_run"], 1, ["no_run is not a ling-jax run directory"]),
        (
            ["train", "--config.data.source={root}/no_corpus.txt", "--workdir={root}/run_a", "--noprogress"],
            1,
            ["no_corpus.txt", "does not exist"],
        ),
        (
            ["train", "--config.data.tokenizer={root}/no_tok.json", "--workdir={root}/run_b", "--noprogress"],
            1,
            ["no_tok.json"],
        ),
    ],
    ids=[
        "missing-config",
        "get-config-non-config",
        "config-file-raises",
        "config-syntax-error",
        "nan-learning-rate",
        "unknown-override",
        "eval-missing-run",
        "missing-corpus",
        "missing-tokenizer",
    ],
)
def test_errors_are_one_line(config_files, args, code, needles):
    args = [a.format(root=config_files) for a in args]
    _one_line_error(_run(*args), code, args[0], *needles)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(config_files, how):
    args = ["params", "--config", str(config_files / "raises.py")]
    proc = _run(*args, "--debug") if how == "flag" else _run(*args, env={"LING_JAX_DEBUG": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "in get_config" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("ling-jax params: config file")


def test_a_real_import_error_is_not_called_a_config_typo(tmp_path):
    """An AttributeError while importing a command module surfaces as itself, even when an override
    happens to mention the same key."""
    script = tmp_path / "broken_import.py"
    script.write_text(
        "import importlib, sys\n"
        "from ling_jax import cli\n"
        "real = importlib.import_module\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'ling_jax.commands.params':\n"
        "        raise AttributeError(\"'bogus'\")\n"
        "    return real(name, *a, **k)\n"
        "importlib.import_module = fake\n"
        "cli.main(['ling-jax', 'params', '--config.train.bogus=1'])\n"
    )
    proc = _run(program=[sys.executable, str(script)])
    line = _one_line_error(proc, 1, "params", "AttributeError: 'bogus'")
    assert "no such config field" not in line


def test_debug_flag_parsing(monkeypatch):
    monkeypatch.delenv("LING_JAX_DEBUG", raising=False)
    assert debug_requested(["ling-jax", "train", "--debug", "--workdir=x"]) == (
        ["ling-jax", "train", "--workdir=x"],
        True,
    )
    assert debug_requested(["ling-jax", "train"]) == (["ling-jax", "train"], False)
    assert debug_requested(["ling-jax", "--debug=false", "eval"]) == (["ling-jax", "eval"], False)
    monkeypatch.setenv("LING_JAX_DEBUG", "1")
    assert debug_requested(["ling-jax", "eval"])[1]
    monkeypatch.setenv("LING_JAX_DEBUG", "0")
    assert not debug_requested(["ling-jax", "eval"])[1]


def test_only_override_resolution_errors_name_config_fields():
    argv = ["ling-jax", "train", "--config.train.bogus=1"]
    config = ml_collections.ConfigDict({"train": {"steps": 1}})
    with pytest.raises(AttributeError) as info:
        config_path.get_type("train.bogus", config)  # what ml_collections runs for an override
    assert _unknown_overrides(argv, info.value) == ["config.train.bogus"]
    try:
        raise AttributeError("'bogus'")  # the same text, raised anywhere else
    except AttributeError as e:
        assert _unknown_overrides(argv, e) == []


def test_eval_result_is_strict_json_even_for_a_nan_loss():
    code = (
        "import json\n"
        "from ling_jax.commands.eval import result_json\n"
        "print(json.dumps([result_json('runs/x', 7, float('nan')), result_json('runs/x', 7, 2.5)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (bad, bad_ok), (good, good_ok) = json.loads(proc.stdout)
    assert not bad_ok and good_ok
    strict = json.loads(bad, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict == {
        "workdir": "runs/x",
        "step": 7,
        "heldout_loss": None,
        "error": "held-out loss is not finite (nan)",
    }
    assert json.loads(good) == {"workdir": "runs/x", "step": 7, "heldout_loss": 2.5}
