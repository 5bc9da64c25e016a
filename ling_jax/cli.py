"""`ling-jax <command> [flags]`: train, eval, merge, params, plan.

Each command lives in ling_jax/commands/<name>.py with its own absl flags and a `main(argv)`;
only the chosen one is imported, so `ling-jax params` never pays for the training stack.

Errors: every failure of every command ends as one line on stderr, "ling-jax <command>: ...", and
a non-zero exit: 2 for a bad flag, config field or config file (nothing has run yet), 1 for a
failure while running. `--debug` (anywhere on the command line) or LING_JAX_DEBUG=1 adds the full
traceback above that line.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from ling_jax.platform import configure_platform, reexec_with_huge_pages

COMMANDS = {
    "train": "train a model from a config (default: tiny Ling on the Python stdlib, CPU-friendly)",
    "eval": "held-out loss of a checkpoint, or passkey retrieval accuracy (--task passkey --length N)",
    "merge": "WSM: merge the last K+1 checkpoints with decay-emulating weights",
    "params": "total / activated parameter counts of a config",
    "plan": "memory / FLOP plan of a config on a TPU topology (ahead-of-time compile)",
    "generate": "stream text from a run's checkpoint or an HF checkpoint (optionally MTP speculative)",
    "sft": "supervised fine-tuning on chat data (default: tiny Ling on the embedded arithmetic task)",
    "rl": "reinforcement learning from an SFT run (LPO / GRPO / GSPO on the embedded arithmetic task)",
}
DEBUG_FLAG = "--debug"
DEBUG_ENV = "LING_JAX_DEBUG"
USAGE_EXIT = 2  # bad command line, flag, config field or config file: nothing ran
FAILURE_EXIT = 1  # the command started and failed


def _usage() -> str:
    lines = ["usage: ling-jax <command> [--flags] [--debug]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "`ling-jax <command> --help` lists a command's flags.",
        f"Errors are one line; {DEBUG_FLAG} or {DEBUG_ENV}=1 shows the full traceback.",
    ]
    return "\n".join(lines)


def debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """argv without --debug / --debug=true|false, and whether tracebacks were asked for (flag or env)."""
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    rest = []
    for arg in argv:
        if arg in (DEBUG_FLAG, f"{DEBUG_FLAG}=true", f"{DEBUG_FLAG}=1"):
            debug = True
        elif arg in (f"{DEBUG_FLAG}=false", f"{DEBUG_FLAG}=0", "--nodebug"):
            debug = False
        else:
            rest.append(arg)
    return rest, debug


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the process's own command line: it may restart itself with huge pages
        try:
            reexec_with_huge_pages()
        except ValueError as e:
            print(f"ling-jax: {e}", file=sys.stderr)
            sys.exit(USAGE_EXIT)
    argv, debug = debug_requested(list(sys.argv if argv is None else argv))
    if debug:  # one switch for the whole process: the checkpointer keeps Orbax's own error logs then
        os.environ[DEBUG_ENV] = "1"
    if len(argv) < 2 or argv[1] not in COMMANDS:
        if len(argv) >= 2 and argv[1] not in ("-h", "--help", "help"):
            print(f"ling-jax: unknown command {argv[1]!r}\n", file=sys.stderr)
            print(_usage(), file=sys.stderr)
            sys.exit(USAGE_EXIT)
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else USAGE_EXIT)
    command = argv[1]
    from ling_jax.commands.flags import expand_presets  # --config NAME: a packaged preset's file

    argv = expand_presets(argv)
    config_file = _check_config_file(command, argv)
    configure_platform()
    from absl import app, flags, logging

    # ml_collections' config flag reads its --config.* overrides from sys.argv, and already applies
    # them when the command module defines the flag (at import): both must see this argv.
    sys.argv = argv
    try:
        module = importlib.import_module(f"ling_jax.commands.{command}")
    except Exception as e:  # every error ends as one line (module docstring)
        _report(command, argv, e, debug, config_file)
    command_argv = [f"ling-jax {command}"] + argv[2:]

    def parse(command_argv):
        try:
            return flags.FLAGS(command_argv)
        except Exception as e:
            _report(command, argv, e, debug, config_file, parsing=True)

    def run(command_argv):
        if not any(a.startswith(("--verbosity", "-v")) for a in command_argv):
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
        try:
            module.main(command_argv)
        except Exception as e:
            _report(command, argv, e, debug, config_file)
        except KeyboardInterrupt:
            print(f"ling-jax {command}: interrupted", file=sys.stderr)
            sys.exit(130)

    app.run(run, argv=command_argv, flags_parser=parse)


def _check_config_file(command: str, argv: list[str]) -> Path | None:
    """The --config file named on the command line, after checking that it exists (ml_collections
    reports a missing one as a many-line OSError that names a flag, not the file)."""
    value = None
    for i, arg in enumerate(argv[2:], start=2):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
    if value is None:
        return None
    path = Path(value)
    if not path.is_file() and ":" in value:  # ml_collections' "file.py:argument" form
        path = Path(value.split(":", 1)[0])
    if not path.is_file():
        _fail(
            command,
            f"config file {value} does not exist" if not path.exists() else f"config file {value} is not a file",
        )
    return path


def _report(
    command: str, argv: list[str], error: BaseException, debug: bool, config_file: Path | None, parsing: bool = False
) -> NoReturn:
    """Exits with one line naming what went wrong (and the traceback above it when debugging)."""
    if isinstance(error, SystemExit):
        raise error
    from absl import flags

    from ling_jax.config import ConfigError  # imports jax: only after any restart (reexec_with_huge_pages)

    if debug:
        traceback.print_exception(error)
    hint = "" if debug else f" (rerun with {DEBUG_FLAG} for the traceback)"
    described = f"{type(error).__name__}: {_first_line(error)}"
    if isinstance(error, ConfigError):
        _fail(command, f"config error: {error}")
    in_config_file = config_file is not None and _raised_in(error, config_file)
    if in_config_file or isinstance(error, SyntaxError) and config_file is not None:
        _fail(command, f"config file {config_file}: {described}{hint}")
    culprits = _unknown_overrides(argv, error)
    if culprits:
        key = str(error).strip("\"'")
        _fail(command, f"no such config field: {', '.join(culprits)} (unknown key {key!r})")
    if parsing and isinstance(error, (flags.Error, ValueError, TypeError)):
        _fail(command, f"bad flag: {_first_line(error)}")
    _fail(command, f"{described}{hint}", FAILURE_EXIT)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _frames(error: BaseException):
    return [frame.filename for frame in traceback.extract_tb(error.__traceback__)]


def _raised_in(error: BaseException, path: Path) -> bool:
    target = path.resolve()
    return any(Path(name).resolve() == target for name in _frames(error) if not name.startswith("<"))


def _unknown_overrides(argv: list[str], error: BaseException) -> list[str]:
    """The --config.* overrides naming a key that does not exist, if `error` is ml_collections
    failing to resolve an override path (and nothing else: a real import error is not a typo)."""
    if not isinstance(error, (AttributeError, KeyError)):
        return []
    resolving_override = any(
        name.replace(os.sep, "/").endswith("ml_collections/config_flags/config_path.py") for name in _frames(error)
    )
    if not resolving_override:
        return []
    key = str(error).strip("\"'")
    return [
        a.split("=", 1)[0].lstrip("-")
        for a in argv[2:]
        if a.startswith(("--config.", "-config.")) and key in a.split("=", 1)[0].split(".")
    ]


def _fail(command: str, message: str, code: int = USAGE_EXIT) -> NoReturn:
    print(f"ling-jax {command}: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
