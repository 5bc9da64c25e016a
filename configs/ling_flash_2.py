"""Ling-flash-2.0: 100B total / 6.1B activated (published shape, ../shared/docs/ling2-spec.md)."""

from ling_jax.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(
        vocab_size=157184, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=4, head_dim=128,
        intermediate_size=9216, num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
        num_shared_experts=1, moe_intermediate_size=1024, first_k_dense_replace=1, num_mtp_layers=1,
        mtp_loss_weight=0.1, routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=10000.0,
        max_position_embeddings=4096, dtype="bfloat16", remat_policy="save_dots",
    )
    config.data.tokenizer = "tokenizer.json"
    config.train.update(batch_size=8352, seq_len=4096, learning_rate=2.61e-4, warmup_steps=2000,
                        z_loss_weight=3.5e-6)
    return config
