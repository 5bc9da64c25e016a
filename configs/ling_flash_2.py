"""The packaged `ling_flash_2` preset (ling_jax/configs/ling_flash_2.py), here where people look for configs."""

from ling_jax.configs.ling_flash_2 import get_config  # noqa: F401
