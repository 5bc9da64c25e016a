"""Tiny Ling SFT: the `tiny` model fine-tuned on the embedded arithmetic task (ling_jax/tasks), three
quarters of the examples with the think-on system prompt and a column-wise <think> trace, a quarter
think-off. Three quarters of the think-on traces end with the filler sentence "all done"
(`sft.verbose_fraction`), so the SFT model pads its reasoning and the RL stage's length reward has
something to remove.

`ling-jax sft --workdir W` with no --config trains it from scratch (no --init) in about 8 minutes
on a 2-core CPU and reports held-out accuracy in both modes; `--init` starts it from a pre-trained run or an
HF checkpoint of the same model. The `sft` section is ling_jax/posttrain/config.py's SFTConfig.
"""

import ml_collections

from ling_jax.configs.tiny import get_config as tiny_config
from ling_jax.posttrain.config import TASK_SOURCE, SFTConfig


def get_config():
    config = tiny_config()
    config.data.update(source=TASK_SOURCE, heldout_fraction=0.0)
    # Rows of 256 bytes hold about two rendered examples (a think-on one is ~120 bytes). The model copies
    # the operands into its trace after ~250 steps and then learns the digit sums; with these settings
    # think-on accuracy was 44% at 800 steps, and 2.6% at 600 with half the examples think-on
    # (benchmarks/README.md, "RL objectives").
    config.train.update(
        steps=800,
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
    config.sft.update(think_fraction=0.75, verbose_fraction=0.75)
    return config
