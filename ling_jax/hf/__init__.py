"""Hugging Face BailingMoeV2 checkpoints: `load_checkpoint(path)`, `save_checkpoint(cfg, variables, path)`."""

from ling_jax.hf.checkpoint import CheckpointError, check_save_target, load_checkpoint, save_checkpoint
from ling_jax.hf.config import config_from_hf, config_to_hf

__all__ = [
    "CheckpointError",
    "check_save_target",
    "load_checkpoint",
    "save_checkpoint",
    "config_from_hf",
    "config_to_hf",
]
