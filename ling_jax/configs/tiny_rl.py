"""Tiny Ling RL: LPO on the embedded arithmetic task, from a `tiny_sft` run (`--init W1`).

`ling-jax rl --init W1 --workdir W2` with no --config uses this preset. The model, tokenizer and
task are tiny_sft's (read from that preset, so `--init` fits); the `rl` section is
ling_jax/rl/config.py's RLConfig. The RL prompts use the think-off system prompt (Evo-CoT starts
from instant answers); rewards: correctness, the <think> format penalty and the length reward.
"""

from ling_jax.configs.tiny_sft import get_config as sft_config
from ling_jax.rl.config import rl_defaults


def get_config():
    config = sft_config()
    sft = config.sft
    del config["sft"]
    # RL's optimizer: a constant LR after a short warmup, no weight decay (the policy should move only
    # where the rewards push it).
    config.train.update(learning_rate=3e-4, warmup_steps=2, weight_decay=0.0, log_every=1, sample_tokens=0)
    config.checkpoint.update(every=10, keep=2)
    config.rl = rl_defaults()
    config.rl.update(
        objective="lpo",
        iterations=30,
        prompts_per_iteration=16,
        group_size=8,
        updates_per_batch=2,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=16,  # think-off answers are a few tokens; a longer one is wrong anyway
        beta=0.0,
        think=False,
        length_alpha=0.2,
        task_max_digits=sft.task_max_digits,
        heldout_problems=500,
        eval_batch_size=500,
    )
    return config
