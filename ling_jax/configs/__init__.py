"""The packaged presets: `get(name)` returns a preset's ml_collections config.

    import ling_jax
    config = ling_jax.configs.get("tiny")        # a fresh ConfigDict each call
    config.train.steps = 50
    model_cfg = ling_jax.configs.model_config("tiny")   # its model section as a ModelConfig

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


def is_preset(value: str) -> bool:
    """Whether `value` names a preset (and not an existing file of that name, which a path means)."""
    return value in names() and not Path(value).exists()


def path(name: str) -> Path:
    """The file of preset `name` inside the installed package (what `--config` can point at)."""
    if name not in names():
        raise ValueError(f"unknown config preset {name!r}; the presets are {', '.join(names())}")
    return Path(__file__).parent / f"{name}.py"


def get(name: str) -> ml_collections.ConfigDict:
    """The ml_collections config of preset `name` (e.g. "tiny", "ling_mini_2", "ling_flash_2", "ling_1t")."""
    path(name)  # the error naming the presets
    return importlib.import_module(f"{__name__}.{name}").get_config()


def model_config(name: str):
    """The `ModelConfig` of preset `name`, validated as `ling-jax train` validates it: what `LingModel`
    takes. (Post-training presets add sections of their own; only the pre-training ones are read.)"""
    from ling_jax.train.config import base_config, experiment_from_config

    config = get(name)
    return experiment_from_config({section: config[section].to_dict() for section in base_config()}).model
