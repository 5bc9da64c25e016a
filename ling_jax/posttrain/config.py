"""The `sft` config section: what the SFT data is and how its result is measured.

The rest of an SFT config is an ordinary experiment (model, data, train, checkpoint, mesh;
ling_jax/train/config.py). `data.source` says where the conversations come from: `TASK_SOURCE`
("task:arithmetic", the embedded task of ling_jax/tasks/arithmetic.py) or a JSONL file of
{"messages": [...]} lines (ling_jax/data/chat.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ling_jax.config import ConfigError, UnknownFieldsError, check_field_types

TASK_SOURCE = "task:arithmetic"


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    think_fraction: float = 0.5  # share of task examples rendered think-on (the rest think-off)
    verbose_fraction: float = 0.0  # share of think-on traces ending with filler (arithmetic.VERBOSE_STEP)
    train_problems: int = 20000  # task problems rendered for training (drawn with replacement)
    heldout_loss_problems: int = 256  # held-out task problems for the held-out loss
    task_max_digits: int = 2
    task_ops: str = "+-"  # the task's operators
    eval_problems: int = 500  # held-out problems for the final accuracy (per mode); 0 = none
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 500

    def __post_init__(self):
        check_field_types(self, "sft.")
        for name in ("think_fraction", "verbose_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"sft.{name}", f"must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("train_problems", "eval_max_new_tokens", "eval_batch_size", "task_max_digits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sft.{name}", f"must be positive, got {getattr(self, name)!r}")
        for name in ("heldout_loss_problems", "eval_problems"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sft.{name}", f"must be >= 0, got {getattr(self, name)!r}")
        if not self.task_ops or set(self.task_ops) - {"+", "-"} or len(set(self.task_ops)) != len(self.task_ops):
            raise ConfigError("sft.task_ops", f"must be '+', '-' or '+-', got {self.task_ops!r}")

    def task_config(self):
        from ling_jax.tasks.arithmetic import TaskConfig

        try:
            return TaskConfig(max_digits=self.task_max_digits, ops=tuple(self.task_ops))
        except ValueError as e:
            raise ConfigError("sft.task_max_digits", str(e)) from None


def sft_config_from(values: Mapping[str, Any] | None) -> SFTConfig:
    """The validated section (unknown fields are errors naming them)."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UnknownFieldsError(unknown, "sft")
    return SFTConfig(**values)
