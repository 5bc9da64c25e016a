"""Ling-flash-2.0, the 32K context-extension stage: RoPE theta 600k, 150B tokens, started from
the 4K stage's run with `ling-jax train --config configs/ling_flash_2_32k.py --init RUNS/ling_flash_2`.
Bias update rate 1e-4, splash attention with the sequence split over the context axis
(ling_jax/train/config.py context_stage). The batch (1,024 x 32K) keeps about the 4K stage's tokens per
step, rounded to a batch that splits over power-of-two meshes (our choice: the report gives no batch
for this stage)."""

from ling_jax.configs.ling_flash_2 import get_config as pretraining_config
from ling_jax.train.config import context_stage


def get_config():
    return context_stage(
        pretraining_config(),
        seq_len=32768,
        batch_size=1024,
        microbatches=8,
        tokens=150e9,
        yarn=False,
        mesh={"data": -1, "context": 4},
    )
