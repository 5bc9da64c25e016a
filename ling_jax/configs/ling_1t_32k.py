"""Ling-1T, the 32K context-extension stage: RoPE theta 600k, 150B tokens, started from
the 4K stage's run with `ling-jax train --config configs/ling_1t_32k.py --init RUNS/ling_1t`.
Bias update rate 1e-4, splash attention with the sequence split over the context axis
(ling_jax/train/config.py context_stage). The batch (2,304 x 32K) keeps about the 4K stage's tokens per
step, rounded to a batch that splits over power-of-two meshes (our choice: the report gives no batch
for this stage)."""

from ling_jax.configs.ling_1t import get_config as pretraining_config
from ling_jax.train.config import context_stage


def get_config():
    return context_stage(
        pretraining_config(),
        seq_len=32768,
        batch_size=2304,
        microbatches=36,
        tokens=150e9,
        yarn=False,
        mesh={"data": 1, "fsdp": -1, "expert": 1, "context": 8, "model": 8},
    )
