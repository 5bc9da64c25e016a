"""Ling-mini-2.0: 16B total / 1.4B activated (published shape, ../shared/docs/ling2-spec.md)."""

from ling_jax.train.config import ling2_config


def get_config():
    return ling2_config(
        layers=20,
        hidden=2048,
        heads=16,
        kv_heads=4,
        dense_width=5120,
        expert_width=512,
        dense_layers=1,
        batch_size=4400,
        learning_rate=3.36e-4,
        microbatches=11,
    )
