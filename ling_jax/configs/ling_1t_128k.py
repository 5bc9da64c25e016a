"""Ling-1T, the 128K stage: YaRN factor 4 over an original 32,768 (RoPE theta 600k), started from the 32K
stage's run with `ling-jax train --config configs/ling_1t_128k.py --init RUNS/ling_1t_32k`. The report gives
no token count for this stage: set train.steps.
Bias update rate 1e-4, splash attention with the sequence split over the context axis
(ling_jax/train/config.py context_stage). The batch (576 x 128K) keeps about the 4K stage's tokens per
step, rounded to a batch that splits over power-of-two meshes (our choice: the report gives no batch
for this stage)."""

from ling_jax.configs.ling_1t import get_config as pretraining_config
from ling_jax.train.config import context_stage


def get_config():
    return context_stage(
        pretraining_config(),
        seq_len=131072,
        batch_size=576,
        microbatches=9,
        tokens=None,
        yarn=True,
        mesh={"data": 1, "fsdp": -1, "expert": 1, "context": 8, "model": 8},
    )
