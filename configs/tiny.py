"""The packaged `tiny` preset (ling_jax/configs/tiny.py), here where people look for configs."""

from ling_jax.configs.tiny import get_config  # noqa: F401
