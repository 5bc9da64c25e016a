"""The packaged `tiny_rl` preset (ling_jax/configs/tiny_rl.py), here where people look for configs."""

from ling_jax.configs.tiny_rl import get_config  # noqa: F401
