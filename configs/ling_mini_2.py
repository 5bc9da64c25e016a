"""The packaged `ling_mini_2` preset (ling_jax/configs/ling_mini_2.py), here where people look for configs."""

from ling_jax.configs.ling_mini_2 import get_config  # noqa: F401
