"""Post-training stages on the pre-training machinery: SFT (`ling-jax sft`).

config.py: the `sft` config section; sft_data.py: chat conversations packed into training rows
with an assistant-only loss mask; accuracy.py: greedy held-out accuracy on the embedded task;
sft.py: the SFT driver (the training loop of ling_jax/train/loop.py with these rows).
"""
