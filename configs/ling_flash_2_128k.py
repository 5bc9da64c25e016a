"""The packaged `ling_flash_2_128k` preset (ling_jax/configs/ling_flash_2_128k.py), where people look for
configs."""

from ling_jax.configs.ling_flash_2_128k import get_config  # noqa: F401
