"""The packaged `ling_1t` preset (ling_jax/configs/ling_1t.py), here where people look for configs."""

from ling_jax.configs.ling_1t import get_config  # noqa: F401
