"""ling_jax: Ling 2.0 (BailingMoeV2) Mixture-of-Experts models in JAX/Flax.

The public API (kept small and stable; everything else is importable from its module):

    import jax, ling_jax
    cfg = ling_jax.configs.model_config("tiny")               # or ling_jax.ModelConfig(...)
    model = ling_jax.LingModel(cfg)
    variables = ling_jax.init_variables(cfg, jax.random.key(0))  # {"params", "expert_bias"}
    out = model.apply(variables, ids_BT)                      # out.logits [B, T, V]
    tokens = ling_jax.generate(cfg, variables, [[1, 2, 3]], max_new_tokens=8).tokens
    ling_jax.save_checkpoint(cfg, variables, "out_dir")       # Hugging Face BailingMoeV2
    cfg, variables = ling_jax.load_checkpoint("out_dir")
    ling_jax.count_params(cfg).activated

Names resolve on first use (PEP 562), so `import ling_jax` loads none of the model, training or
checkpoint code; functions taking variables accept `init`'s logically partitioned boxes or plain
arrays (`ling_jax.unbox`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute in it; None = the module itself)
_EXPORTS = {
    "ModelConfig": ("ling_jax.config", "ModelConfig"),
    "ConfigError": ("ling_jax.config", "ConfigError"),
    "LingModel": ("ling_jax.model", "LingModel"),
    "LingOutput": ("ling_jax.model", "LingOutput"),
    "init_variables": ("ling_jax.model", "init_variables"),
    "apply_checked": ("ling_jax.model", "apply_checked"),
    "generate": ("ling_jax.decoding", "generate"),
    "load_checkpoint": ("ling_jax.hf", "load_checkpoint"),
    "save_checkpoint": ("ling_jax.hf", "save_checkpoint"),
    "count_params": ("ling_jax.params", "count_params"),
    "ParamCounts": ("ling_jax.params", "ParamCounts"),
    "unbox": ("ling_jax.variables", "unbox"),
    "configs": ("ling_jax.configs", None),
}

__all__ = [  # spelled out for linters and IDEs; the same names as _EXPORTS (tests/test_public_api.py)
    "__version__",
    "ConfigError",
    "LingModel",
    "LingOutput",
    "ModelConfig",
    "ParamCounts",
    "apply_checked",
    "configs",
    "count_params",
    "generate",
    "init_variables",
    "load_checkpoint",
    "save_checkpoint",
    "unbox",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from ling_jax import configs
    from ling_jax.config import ConfigError, ModelConfig
    from ling_jax.decoding import generate
    from ling_jax.hf import load_checkpoint, save_checkpoint
    from ling_jax.model import LingModel, LingOutput, apply_checked, init_variables
    from ling_jax.params import ParamCounts, count_params
    from ling_jax.variables import unbox


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ling_jax' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
