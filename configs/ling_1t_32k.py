"""The packaged `ling_1t_32k` preset (ling_jax/configs/ling_1t_32k.py), here where people look for configs."""

from ling_jax.configs.ling_1t_32k import get_config  # noqa: F401
