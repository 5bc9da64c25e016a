"""`ling-jax <command> [flags]`: train, eval, merge, params, plan.

Each command lives in ling_jax/commands/<name>.py with its own absl flags and a `main(argv)`;
only the chosen one is imported, so `ling-jax params` never pays for the training stack.
"""

from __future__ import annotations

import importlib
import sys

from ling_jax.platform import configure_platform, reexec_with_huge_pages

COMMANDS = {
    "train": "train a model from a config (default: tiny Ling on the Python stdlib, CPU-friendly)",
    "eval": "held-out loss of a checkpoint",
    "merge": "WSM: merge the last K+1 checkpoints with decay-emulating weights",
    "params": "total / activated parameter counts of a config",
    "plan": "memory / FLOP plan of a config on a TPU topology (ahead-of-time compile)",
}


def _usage() -> str:
    lines = ["usage: ling-jax <command> [--flags]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`ling-jax <command> --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the process's own command line: it may restart itself with huge pages
        try:
            reexec_with_huge_pages()
        except ValueError as e:
            print(f"ling-jax: {e}", file=sys.stderr)
            sys.exit(2)
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        if len(argv) >= 2 and argv[1] not in ("-h", "--help", "help"):
            print(f"ling-jax: unknown command {argv[1]!r}\n", file=sys.stderr)
            print(_usage(), file=sys.stderr)
            sys.exit(2)
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    configure_platform()
    from absl import app, flags, logging

    from ling_jax.config import ConfigError  # imports jax: only after any restart (reexec_with_huge_pages)

    # ml_collections' config flag reads its --config.* overrides from sys.argv, and already applies
    # them when the command module defines the flag (at import): both must see this argv.
    sys.argv = argv
    try:
        module = importlib.import_module(f"ling_jax.commands.{argv[1]}")
    except (AttributeError, KeyError) as e:
        _fail_unknown_config_field(argv, e)
    command_argv = [f"ling-jax {argv[1]}"] + argv[2:]

    def parse(command_argv):  # a bad flag or config key is one clear line, not a traceback
        try:
            return flags.FLAGS(command_argv)
        except (AttributeError, KeyError) as e:
            _fail_unknown_config_field(argv, e, otherwise=f"bad flag: {e}")
        except (flags.Error, ValueError, TypeError) as e:
            _fail(argv[1], f"bad flag: {e}")

    def run(command_argv):
        if not any(a.startswith(("--verbosity", "-v")) for a in command_argv):
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
        try:
            module.main(command_argv)
        except ConfigError as e:
            _fail(argv[1], f"config error: {e}")

    app.run(run, argv=command_argv, flags_parser=parse)


def _fail_unknown_config_field(argv: list[str], error: Exception, otherwise: str | None = None) -> None:
    """Exit 2 naming the --config.* override(s) whose field does not exist. If no override mentions
    the missing key (it is no config typo): exit 2 with `otherwise`, or re-raise `error` without it."""
    key = str(error).strip("\"'")
    culprits = [
        a.split("=", 1)[0].lstrip("-")
        for a in argv[2:]
        if a.startswith(("--config.", "-config.")) and key in a.split("=", 1)[0].split(".")
    ]
    if not culprits:
        if otherwise is None:
            raise error
        _fail(argv[1], otherwise)
    _fail(argv[1], f"no such config field: {', '.join(culprits)} (unknown key {key!r})")


def _fail(command: str, message: str) -> None:
    print(f"ling-jax {command}: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
