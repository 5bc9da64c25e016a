"""Ling-1T: 1T total / ~50B activated. The report's shape: 80 layers, 4 leading dense layers
(Megatron-Bridge says 1), 1 MTP layer, 4K sequences (../shared/docs/ling2-spec.md)."""

from ling_jax.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(
        vocab_size=157184, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
        intermediate_size=18432, num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
        num_shared_experts=1, moe_intermediate_size=2048, first_k_dense_replace=4, num_mtp_layers=1,
        mtp_loss_weight=0.1, routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=10000.0,
        max_position_embeddings=4096, dtype="bfloat16", remat_policy="full",
    )
    config.data.tokenizer = "tokenizer.json"
    config.train.update(batch_size=18144, seq_len=4096, learning_rate=1.86e-4, warmup_steps=2000,
                        z_loss_weight=3.5e-6)
    config.mesh.update(data=1, fsdp=-1, expert=1, model=1)
    return config
