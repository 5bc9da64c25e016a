"""The packaged `ling_mini_2_128k` preset (ling_jax/configs/ling_mini_2_128k.py), here where people look for configs."""

from ling_jax.configs.ling_mini_2_128k import get_config  # noqa: F401
