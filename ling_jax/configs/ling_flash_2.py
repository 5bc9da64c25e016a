"""Ling-flash-2.0: 100B total / 6.1B activated (published shape, ../shared/docs/ling2-spec.md)."""

from ling_jax.train.config import ling2_config


def get_config():
    return ling2_config(
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=4,
        dense_width=9216,
        expert_width=1024,
        dense_layers=1,
        batch_size=8352,
        learning_rate=2.61e-4,
        microbatches=29,
    )
