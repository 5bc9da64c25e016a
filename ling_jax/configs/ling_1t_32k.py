"""Ling-1T, the 32K context-extension stage: RoPE theta 600k, 150B tokens, started from
the 4K stage's run with `ling-jax train --config configs/ling_1t_32k.py --init RUNS/ling_1t`.
Bias update rate 1e-4, splash attention with the sequence split over the context axis
(ling_jax/train/config.py context_stage). The batch (2,304 x 32K) keeps about the 4K stage's tokens per
step, rounded to a batch that splits over power-of-two meshes (our choice: the report gives no batch
for this stage).

The mesh is sized for v5p:16x16x16 (4,096 chips: fsdp 128 x context 4 x model 8), 18 microbatches of
128 rows: compiled ahead of time to 90.23 GiB per chip of 95; context 8 with fsdp 64 (36 microbatches
of 64 rows) compiled to 97.66 GiB and does not fit (benchmarks/README.md)."""

from ling_jax.configs.ling_1t import get_config as pretraining_config
from ling_jax.train.config import context_stage


def get_config():
    return context_stage(
        pretraining_config(),
        seq_len=32768,
        batch_size=2304,
        microbatches=18,
        tokens=150e9,
        yarn=False,
        mesh={"data": 1, "fsdp": -1, "expert": 1, "context": 4, "model": 8},
    )
