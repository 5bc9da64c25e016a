"""The packaged presets: `get(name)` returns a preset's ml_collections config.

    import ling_jax
    config = ling_jax.configs.get("tiny")        # a fresh ConfigDict each call
    config.train.steps = 50

Each preset is a module here with a `get_config()`; `configs/` at the top of the repository holds
thin files that import these (the paths the CLI examples use), so an installed package and a clone
see the same presets.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import ml_collections


def names() -> list[str]:
    """The preset names, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def path(name: str) -> Path:
    """The file of preset `name` inside the installed package (what `--config` can point at)."""
    if name not in names():
        raise ValueError(f"unknown config preset {name!r}; the presets are {', '.join(names())}")
    return Path(__file__).parent / f"{name}.py"


def get(name: str) -> ml_collections.ConfigDict:
    """The ml_collections config of preset `name` (e.g. "tiny", "ling_mini_2", "ling_flash_2", "ling_1t")."""
    path(name)  # the error naming the presets
    return importlib.import_module(f"{__name__}.{name}").get_config()
