"""Tiny Ling SFT: the `tiny` model fine-tuned on the embedded arithmetic task (ling_jax/tasks), half
of the examples with the think-on system prompt and a column-wise <think> trace, half think-off.

`ling-jax sft --workdir W` with no --config trains it from scratch (no --init) in about 4.5 minutes
on a 2-core CPU and reports held-out accuracy in both modes; `--init` starts it from a pre-trained run or an
HF checkpoint of the same model. The `sft` section is ling_jax/posttrain/config.py's SFTConfig.
"""

import ml_collections

from ling_jax.configs.tiny import get_config as tiny_config
from ling_jax.posttrain.config import TASK_SOURCE, SFTConfig


def get_config():
    config = tiny_config()
    config.data.update(source=TASK_SOURCE, heldout_fraction=0.0)
    # Rows of 256 bytes hold about two rendered examples (a think-on one is ~120 bytes). 600 steps: the
    # model copies the operands into its trace after ~250 and then learns the digit sums; measured
    # think-on accuracy 23% at 600 steps, 1.4% at 300 (benchmarks/README.md, "RL objectives").
    config.train.update(
        steps=600,
        batch_size=16,
        seq_len=256,
        learning_rate=3e-3,
        warmup_steps=30,
        log_every=20,
        eval_every=0,
        eval_batches=4,
        sample_tokens=0,
    )
    config.checkpoint.update(every=200, keep=3)
    config.sft = ml_collections.ConfigDict({f: getattr(SFTConfig(), f) for f in SFTConfig.__dataclass_fields__})
    return config
