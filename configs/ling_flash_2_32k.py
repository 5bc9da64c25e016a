"""The packaged `ling_flash_2_32k` preset (ling_jax/configs/ling_flash_2_32k.py), here where people look for configs."""

from ling_jax.configs.ling_flash_2_32k import get_config  # noqa: F401
