"""Ling-1T: 1T total / ~50B activated. The report's shape: 80 layers, 4 leading dense layers
(Megatron-Bridge says 1), 1 MTP layer, 4K sequences (../shared/docs/ling2-spec.md)."""

from ling_jax.train.config import ling2_config


def get_config():
    config = ling2_config(
        layers=80,
        hidden=8192,
        heads=64,
        kv_heads=8,
        dense_width=18432,
        expert_width=2048,
        dense_layers=4,
        batch_size=18144,
        learning_rate=1.86e-4,
        microbatches=21,
    )
    config.model.remat_policy = "full"
    # The published batch of 18,144 x 4K splits at most 32 ways (18,144 = 2^5 x 3^4 x 7), so on
    # v5p:8x8x16 (1,024 chips) the sequence takes the other 32 ways (context). What
    # `ling-jax plan --config configs/ling_1t.py --topology v5p:8x8x16 --search` chose, compiled
    # ahead of time: fsdp=8 expert=4 context=32, 21 microbatches of 864 rows, 89.38 GiB per chip of 95
    # (benchmarks/README.md).
    config.mesh.update(data=1, fsdp=-1, expert=4, context=32, model=1)
    return config
