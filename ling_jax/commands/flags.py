"""Flags shared by commands: the ml_collections config file (with --config.key=value overrides)."""

from __future__ import annotations

from pathlib import Path

from ml_collections import config_flags

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def define_config_flag():
    return config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "ml_collections config file; override fields with --config.section.key=value",
        lock_config=True,
    )
