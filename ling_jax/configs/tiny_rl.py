"""Tiny Ling RL: LPO on the embedded arithmetic task, from a `tiny_sft` run (`--init W1`).

`ling-jax rl --init W1 --workdir W2` with no --config uses this preset. The model, tokenizer and
task are tiny_sft's (read from that preset, so `--init` fits); the `rl` section is
ling_jax/rl/config.py's RLConfig. Rewards: correctness, the <think> format penalty and the length
reward (in groups with a correct completion).

The prompts use the think-on system prompt: the tiny SFT model answers 44% of the held-out
problems through its <think> trace and almost none directly (think-off: 1%); with a few correct
samples in a hundred most groups would hold none, and there would be little for RL to reinforce.
The measurements behind the learning rate and the length-reward scope are in benchmarks/README.md
("RL objectives").
"""

from ling_jax.configs.tiny_sft import get_config as sft_config
from ling_jax.rl.config import rl_defaults


def get_config():
    config = sft_config()
    sft = config.sft
    del config["sft"]
    # RL's optimizer: a constant LR after a short warmup, no weight decay (the policy should move only
    # where the rewards push it). Adam scales every weight's step to about the LR whatever the size
    # of its (noisy) policy gradient: from this SFT start 1e-3 and 3e-4 wore held-out accuracy down to
    # ~0, 1e-4 raised it.
    config.train.update(learning_rate=1e-4, warmup_steps=2, weight_decay=0.0, log_every=1, sample_tokens=0)
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
        max_new_tokens=48,  # a 2-digit think-on reply, filler and stop token included, is <= 45 tokens
        beta=0.0,
        think=True,
        length_alpha=0.2,
        length_solved_groups_only=True,
        task_max_digits=sft.task_max_digits,
        heldout_problems=500,
        eval_batch_size=500,
    )
    return config
