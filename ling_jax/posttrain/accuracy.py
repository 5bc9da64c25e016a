"""Held-out accuracy on the embedded task: greedy decoding of each problem's prompt, checked exactly.

`task_accuracy(cfg, variables, tokenizer, problems, think=...)` renders each problem as a chat
prompt with the think-on or think-off system prompt (ling_jax/data/chat.py), decodes greedily with
the project's KV-cache sampler until the turn's stop token, and scores the decoded text with the
task's checker. SFT reports it at the end; the RL stage can call it at its iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.data import chat
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.decoding.generate import generate
from ling_jax.tasks import arithmetic

HELDOUT_SEED = 0  # the held-out problems every stage reports on (SFT's end, RL's iterations)


def heldout_problems(n: int, task_config: arithmetic.TaskConfig | None = None) -> list[arithmetic.Problem]:
    """The first `n` held-out problems of the fixed evaluation seed: the same for every stage."""
    return arithmetic.make_split("heldout", n, HELDOUT_SEED, task_config)


class Accuracy(NamedTuple):
    accuracy: float  # share of problems answered exactly
    mean_length: float  # mean generated tokens, the stop token included
    completions: list[str]  # decoded replies, in problem order


def prompt_ids(problem: arithmetic.Problem, tokenizer: Tokenizer, *, think: bool) -> np.ndarray:
    """The chat prompt of a task problem (system prompt by mode, the problem, the assistant header)."""
    return chat.render_prompt(chat.conversation(problem.prompt, think=think), tokenizer)


def task_accuracy(
    cfg: ModelConfig,
    variables,
    tokenizer: Tokenizer,
    problems: Sequence[arithmetic.Problem],
    *,
    think: bool,
    max_new_tokens: int = 64,
    batch_size: int = 500,
) -> Accuracy:
    """Greedy accuracy of `variables` on `problems` in one mode (see the module docstring)."""
    if not problems:
        raise ValueError("task_accuracy needs at least one problem")
    stop = chat.role_end_id(tokenizer)
    completions, lengths = [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [prompt_ids(p, tokenizer, think=think) for p in chunk]
        if len(chunk) < batch_size and start > 0:  # keep one compiled shape: pad with the last prompt
            prompts += [prompts[-1]] * (batch_size - len(chunk))
        out = generate(cfg, variables, prompts, max_new_tokens=max_new_tokens, stop_tokens=[stop])
        for row in range(len(chunk)):
            n = int(out.lengths[row])
            completions.append(tokenizer.decode(out.tokens[row, :n].tolist()))
            lengths.append(n)
    correct = [arithmetic.check(c, p) for c, p in zip(completions, problems)]
    return Accuracy(float(np.mean(correct)), float(np.mean(lengths)), completions)
