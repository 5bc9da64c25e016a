"""The packaged `tiny_sft` preset (ling_jax/configs/tiny_sft.py), here where people look for configs."""

from ling_jax.configs.tiny_sft import get_config  # noqa: F401
