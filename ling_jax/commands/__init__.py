"""Command-line entry points (see ling_jax/cli.py)."""
