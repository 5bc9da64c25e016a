"""The `rl` config section and the one place where an RL config becomes frozen dataclasses.

An RL config is a training config (model, data, train, checkpoint, mesh: ling_jax/train/config.py;
train.learning_rate, warmup_steps, b1, b2, weight_decay, grad_clip and seed drive the policy's
AdamW) plus an `rl` section, built here into `RLConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from ling_jax.config import ConfigError, UnknownFieldsError, check_field_types
from ling_jax.rl.objectives import default_eps
from ling_jax.train.config import Experiment, experiment_from_config

# objective -> the unit its ratio is clipped over (ling_jax/rl/objectives.py)
OBJECTIVE_LEVELS = {"grpo": "token", "lpo": "sentence", "gspo": "sequence"}


@dataclasses.dataclass(frozen=True)
class RLConfig:
    init: str = ""  # the SFT run directory (or HF checkpoint) the policy and the reference start from
    objective: str = "lpo"  # lpo (sentence units) | grpo (token) | gspo (sequence)
    eps_low: float = -1.0  # -1: the objective's default (objectives.DEFAULT_EPS)
    eps_high: float = -1.0
    iterations: int = 30  # sample -> score -> update rounds
    prompts_per_iteration: int = 16  # P
    group_size: int = 8  # G completions per prompt; >= 2 (one sample has no group variance)
    updates_per_batch: int = 2  # optimizer steps on each sampled batch
    temperature: float = 1.0  # sampling; the recorded log-probs are always the temperature-1 policy's
    top_p: float = 1.0
    max_new_tokens: int = 48
    beta: float = 0.0  # KL(pi || pi_ref) penalty weight (k3 estimator), pi_ref the frozen init policy
    think: bool = False  # the system prompt of the RL prompts: think on, or off (Evo-CoT starts off)
    correctness_weight: float = 1.0  # +1 / 0 from the task's checker
    format_weight: float = 1.0  # -0.5 for <think> in think-off mode
    length_alpha: float = 0.0  # length reward alpha (0: off)
    length_solved_groups_only: bool = True  # no length reward in a group with no correct completion
    task_max_digits: int = 3  # the embedded arithmetic task (ling_jax/tasks/arithmetic.py)
    heldout_problems: int = 500  # greedy held-out accuracy, at the first and last iteration
    eval_every: int = 0  # also every N iterations (0: first and last only)
    eval_batch_size: int = 500  # held-out problems decoded per call

    def __post_init__(self):
        check_field_types(self, "rl.")
        if self.objective not in OBJECTIVE_LEVELS:
            raise ConfigError("rl.objective", f"must be one of {', '.join(OBJECTIVE_LEVELS)}, got {self.objective!r}")
        if self.group_size < 2:
            raise ConfigError(
                "rl.group_size",
                f"must be >= 2, got {self.group_size}: with one completion per prompt there is no group "
                "variance, every advantage is 0 and nothing would be learnt",
            )
        for name in ("iterations", "prompts_per_iteration", "updates_per_batch", "max_new_tokens", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"rl.{name}", f"must be positive, got {getattr(self, name)}")
        for name in ("heldout_problems", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("beta", "temperature", "length_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.temperature == 0:
            raise ConfigError("rl.temperature", "must be > 0: RL samples (greedy decoding gives no group variance)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("rl.top_p", f"must be in (0, 1], got {self.top_p}")
        if not (self.eps_low == -1.0 or 0.0 <= self.eps_low < 1.0):
            raise ConfigError("rl.eps_low", f"must be in [0, 1) or -1 (the objective's default), got {self.eps_low}")
        if not (self.eps_high == -1.0 or self.eps_high >= 0.0):
            raise ConfigError("rl.eps_high", f"must be >= 0 or -1 (the objective's default), got {self.eps_high}")

    @property
    def level(self) -> str:
        return OBJECTIVE_LEVELS[self.objective]

    @property
    def eps(self) -> tuple[float, float]:
        """(eps_low, eps_high) with the objective's defaults filled in."""
        low, high = default_eps(self.level)
        return (low if self.eps_low == -1.0 else self.eps_low, high if self.eps_high == -1.0 else self.eps_high)

    @property
    def batch_rows(self) -> int:
        return self.prompts_per_iteration * self.group_size


def rl_defaults() -> ml_collections.ConfigDict:
    """The `rl` section at its defaults (for preset files)."""
    return ml_collections.ConfigDict({f.name: getattr(RLConfig(), f.name) for f in dataclasses.fields(RLConfig)})


def rl_from_config(config: ml_collections.ConfigDict | Mapping) -> tuple[Experiment, RLConfig]:
    """(Experiment, RLConfig) of an RL config; ConfigError naming the first bad field."""
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    rl_values = dict(values.pop("rl", None) or {})
    known = {f.name for f in dataclasses.fields(RLConfig)}
    unknown = sorted(set(rl_values) - known)
    if unknown:
        raise UnknownFieldsError(unknown, "rl")
    return experiment_from_config(values), RLConfig(**rl_values)


def rl_to_dict(rl: RLConfig) -> dict:
    return dataclasses.asdict(rl)
