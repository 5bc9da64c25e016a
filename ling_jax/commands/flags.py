"""Flags shared by commands: the config (a preset name or an ml_collections config file, with
--config.key=value overrides).

`--config tiny` names a preset packaged in ling_jax/configs/ (`ling_jax.configs.names()`), so an
installed package needs no source tree; any other value is a config file path (ml_collections'
`file.py` or `file.py:argument`). An existing file of that name wins over a preset.
"""

from __future__ import annotations

from ml_collections import config_flags

from ling_jax import configs

DEFAULT_CONFIG = str(configs.path("tiny"))
CONFIG_FLAG = "config"


def config_file(value: str) -> str:
    """The config file a --config value names: a preset's packaged file, else `value` itself."""
    return str(configs.path(value)) if configs.is_preset(value) else value


def expand_presets(argv: list[str]) -> list[str]:
    """`argv` with a preset name after --config (`--config NAME` or `--config=NAME`) replaced by its
    file, so everything that reads the command line (the override flags, error messages naming the
    config file) sees a path."""
    out = list(argv)
    for i, arg in enumerate(out):
        for prefix in (f"--{CONFIG_FLAG}=", f"-{CONFIG_FLAG}="):
            if arg.startswith(prefix):
                out[i] = prefix + config_file(arg[len(prefix) :])
        if arg in (f"--{CONFIG_FLAG}", f"-{CONFIG_FLAG}") and i + 1 < len(out):
            out[i + 1] = config_file(out[i + 1])
    return out


def define_config_flag(default: str = DEFAULT_CONFIG, help_string: str | None = None):
    """The --config flag (default: the tiny preset). A preset name reaches it as its file: the CLI
    passes the command line through `expand_presets` first."""
    return config_flags.DEFINE_config_file(
        CONFIG_FLAG,
        config_file(default),
        help_string
        or f"a preset ({', '.join(configs.names())}) or an ml_collections config file; "
        "override fields with --config.section.key=value",
        lock_config=True,
    )
