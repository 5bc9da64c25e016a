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
        microbatches=189,
    )
    config.model.remat_policy = "full"
    # moe_dispatch "auto" (ragged on TPU, per batch shard) compiled for v5p:16x16x16, mesh data=1 fsdp=512
    # expert=1 model=8, batch 512 x 4K: 31.22 GiB per chip at 1.25x the model FLOPs (dense: 36.26 GiB, 23.6x).
    config.mesh.update(data=1, fsdp=-1, expert=1, model=1)
    return config
