"""The one place where an ml_collections ConfigDict becomes frozen dataclasses.

Preset files in configs/ start from `base_config()` and change fields; `experiment_from_config`
validates every section (unknown keys are errors naming them) and returns an `Experiment`.
Code below this module never sees the ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from ling_jax.config import ConfigError, ModelConfig, UnknownFieldsError, check_field_types


def _require(section: str, name: str, ok: bool, requirement: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{section}.{name}", f"must be {requirement}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (the Python standard library's own sources) or .txt/.jsonl paths
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    heldout_fraction: float = 0.02
    max_tokens: int = 0  # 0 = the whole corpus
    passkey_fraction: float = 0.0  # share of train rows that are passkey-retrieval samples (ling_jax/tasks/passkey.py)

    def __post_init__(self):
        check_field_types(self, "data.")
        for name in ("source", "tokenizer"):
            _require("data", name, bool(getattr(self, name).strip()), "a non-empty string", getattr(self, name))
        _require("data", "heldout_fraction", 0.0 <= self.heldout_fraction < 1.0, "in [0, 1)", self.heldout_fraction)
        _require("data", "max_tokens", self.max_tokens >= 0, ">= 0 (0: the whole corpus)", self.max_tokens)
        _require("data", "passkey_fraction", 0.0 <= self.passkey_fraction < 1.0, "in [0, 1)", self.passkey_fraction)


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """The global batch grows linearly in tokens seen from `start` sequences to `train.batch_size`
    over the first `tokens` tokens (the Ling 2.0 report: from 3,024 over roughly 500B tokens). It
    grows in whole microbatches (the microbatch shape stays fixed; ling_jax/train/ramp.py).
    `start` 0 = no ramp."""

    start: int = 0
    tokens: float = 0.0

    def __post_init__(self):
        check_field_types(self, "train.batch_ramp.")
        _require("train.batch_ramp", "start", self.start >= 0, ">= 0 (0: no ramp)", self.start)
        _require("train.batch_ramp", "tokens", self.tokens >= 0, ">= 0", self.tokens)
        if self.start and not self.tokens:
            raise ConfigError("train.batch_ramp.tokens", f"must be positive when batch_ramp.start={self.start}")

    @property
    def enabled(self) -> bool:
        return self.start > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    seed: int = 0
    batch_size: int = 16  # global, in sequences (at the peak, when batch_ramp is on)
    # Gradient accumulation: the batch is cut into this many microbatches of batch_size/microbatches
    # rows, scanned inside the one jitted step (ling_jax/train/step.py); 1 = one pass.
    microbatches: int = 1
    batch_ramp: BatchRamp = BatchRamp()
    seq_len: int = 128  # at most model.max_position_embeddings
    learning_rate: float = 3e-3  # WSM: peak, held constant after warmup
    warmup_steps: int = 30
    b1: float = 0.9  # AdamW moment decays, in [0, 1)
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; must be positive (0 would zero every update)
    eps: float = 1e-8
    z_loss_weight: float = 0.0  # router z-loss (the released Ling scripts use 3.5e-6)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing rate u; 0 disables the update
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf losses before the run stops
    peak_flops_per_device: float = 0.0  # for MFU; 0 = measure the matmul peak at start-up
    sample_tokens: int = 200
    sample_prompt: str = "def "
    sample_temperature: float = 0.0  # 0 = greedy

    def __post_init__(self):
        if isinstance(self.batch_ramp, Mapping):  # from a ConfigDict / config.json
            unknown = sorted(set(self.batch_ramp) - {f.name for f in dataclasses.fields(BatchRamp)})
            if unknown:
                raise UnknownFieldsError([f"batch_ramp.{k}" for k in unknown], "train.batch_ramp")
            object.__setattr__(self, "batch_ramp", BatchRamp(**self.batch_ramp))
        elif not isinstance(self.batch_ramp, BatchRamp):
            raise ConfigError("train.batch_ramp", f"must be a section (start, tokens), got {self.batch_ramp!r}")
        check_field_types(self, "train.")
        for name in ("steps", "batch_size", "microbatches", "log_every", "max_nonfinite_steps"):
            _require("train", name, getattr(self, name) > 0, "positive", getattr(self, name))
        _require("train", "seq_len", self.seq_len >= 2, ">= 2", self.seq_len)
        for name in ("seed", "warmup_steps", "eval_every", "eval_batches", "sample_tokens"):
            _require("train", name, getattr(self, name) >= 0, ">= 0", getattr(self, name))
        for name in ("learning_rate", "grad_clip", "eps"):
            _require("train", name, getattr(self, name) > 0, "positive", getattr(self, name))
        for name in ("b1", "b2"):
            _require("train", name, 0.0 <= getattr(self, name) < 1.0, "in [0, 1)", getattr(self, name))
        for name in ("weight_decay", "z_loss_weight", "bias_update_rate", "sample_temperature"):
            _require("train", name, getattr(self, name) >= 0, ">= 0", getattr(self, name))
        _require(
            "train",
            "peak_flops_per_device",
            self.peak_flops_per_device >= 0,
            "positive (or 0: measure the matmul peak at start-up)",
            self.peak_flops_per_device,
        )
        if self.batch_size % self.microbatches:
            raise ConfigError(
                "train.microbatches",
                f"({self.microbatches}) must divide train.batch_size ({self.batch_size}) into equal microbatches",
            )
        ramp = self.batch_ramp
        if ramp.enabled and self.microbatches == 1:
            raise ConfigError(
                "train.batch_ramp",
                "needs train.microbatches > 1: the ramp grows the batch in whole microbatches of "
                "train.batch_size / train.microbatches rows",
            )
        if ramp.enabled and not ramp.start <= self.batch_size:
            raise ConfigError(
                "train.batch_ramp.start", f"({ramp.start}) must be <= train.batch_size ({self.batch_size}), the peak"
            )

    @property
    def microbatch_size(self) -> int:
        """Rows of one microbatch (fixed for the whole run, the batch ramp included)."""
        return self.batch_size // self.microbatches


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (0 = only the final one)
    keep: int = 8  # checkpoints kept: the WSM merge window plus one
    async_save: bool = True

    def __post_init__(self):
        check_field_types(self, "checkpoint.")
        _require("checkpoint", "every", self.every >= 0, ">= 0 (0: only the final checkpoint)", self.every)
        _require("checkpoint", "keep", self.keep >= 1, ">= 1", self.keep)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh; the product must equal the device count. One axis may be -1 (the rest)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    # Context parallelism: the sequence split over this many devices (train.seq_len must be a
    # multiple of 2 x context: ling_jax/ops/context_parallel.py balances causal work over 2 chunks each).
    context: int = 1
    model: int = 1

    @property
    def axes(self) -> dict[str, int]:
        return {
            "data": self.data,
            "fsdp": self.fsdp,
            "expert": self.expert,
            "context": self.context,
            "model": self.model,
        }

    def __post_init__(self):
        check_field_types(self, "mesh.")
        sizes = self.axes
        for name, v in sizes.items():
            _require("mesh", name, v >= 1 or v == -1, "a positive size or -1 (the rest of the devices)", v)
        if sum(v == -1 for v in sizes.values()) > 1:
            auto = [f"mesh.{n}" for n, v in sizes.items() if v == -1]
            raise ConfigError(auto[1], f"is -1 like {auto[0]}: at most one axis may be -1, got {sizes}")
        if self.context == -1:
            raise ConfigError("mesh.context", "must be a positive size (the sequence split), not -1")


@dataclasses.dataclass(frozen=True)
class Experiment:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig

    def __post_init__(self):
        if self.train.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                "train.seq_len",
                f"({self.train.seq_len}) must be <= model.max_position_embeddings "
                f"({self.model.max_position_embeddings})",
            )
        C = self.mesh.context
        if C > 1 and self.train.seq_len % (2 * C):
            raise ConfigError(
                "mesh.context",
                f"({C}) must split train.seq_len ({self.train.seq_len}) into 2 x {C} equal chunks (two per "
                f"device, for the causal load balance): seq_len must be a multiple of {2 * C}",
            )
        if self.model.attention_impl == "splash":
            from ling_jax.ops.attention_splash import unsupported_reason  # the kernel's limits, said once

            why = unsupported_reason(self.train.seq_len // C, self.train.seq_len)
            if why is None and C > 1 and self.train.seq_len % (C * C):
                why = f"its row shards need train.seq_len ({self.train.seq_len}) to be a multiple of mesh.context^2"
            if why is not None:
                raise ConfigError(
                    "model.attention_impl",
                    f"'splash' cannot take train.seq_len={self.train.seq_len} with mesh.context={C}: {why}; "
                    "use 'auto' (falls back to 'xla') or 'xla'",
                )


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "mesh": MeshConfig,
}


def _build(cls, section: str, values: Mapping[str, Any]):
    try:
        if cls is ModelConfig:
            return ModelConfig.from_mapping(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UnknownFieldsError(unknown, section)
        return cls(**values)
    except ConfigError as e:
        if cls is ModelConfig or isinstance(e, UnknownFieldsError):  # named as the user wrote them
            raise e.within(section) from None
        raise


def base_config() -> ml_collections.ConfigDict:
    """Every section at its defaults (model: Ling-mini-2.0's shape)."""
    config = ml_collections.ConfigDict()
    for name, cls in _SECTIONS.items():
        fields = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        fields = {  # a nested section (train.batch_ramp) as a nested ConfigDict
            k: ml_collections.ConfigDict(dataclasses.asdict(v)) if dataclasses.is_dataclass(v) else v
            for k, v in fields.items()
        }
        config[name] = ml_collections.ConfigDict(fields)
    config.model.rope_scaling = ml_collections.ConfigDict(
        {"factor": 0.0, "original_max_position_embeddings": 0}
    )  # factor 0 = no rope scaling
    return config


def ling2_config(
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    dense_width: int,
    expert_width: int,
    dense_layers: int,
    batch_size: int,
    learning_rate: float,
    microbatches: int,
) -> ml_collections.ConfigDict:
    """A published Ling 2.0 size: what all three share (../shared/docs/ling2-spec.md) plus its shape
    and its 4K pre-training stage: the batch (sequences of 4K) and peak LR from the report, RoPE
    theta 10k, and the report's batch ramp from 3,024 sequences over the first 500B tokens, grown in
    `microbatches` steps of batch_size / microbatches rows (the start rounded up to whole microbatches)."""
    config = base_config()
    config.model.update(
        vocab_size=157184,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=128,
        intermediate_size=dense_width,
        num_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        num_shared_experts=1,
        moe_intermediate_size=expert_width,
        first_k_dense_replace=dense_layers,
        num_mtp_layers=1,
        mtp_loss_weight=0.1,
        routed_scaling_factor=2.5,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        dtype="bfloat16",
        remat_policy="save_dots",
        # "auto": the platform's dispatch (ragged on TPU and Hopper GPUs), run per batch shard under a
        # mesh (ling_jax/layers/moe.py); benchmarks/README.md's plan section has the compiled figures.
        moe_dispatch="auto",
    )
    config.data.tokenizer = "tokenizer.json"  # the official Ling tokenizer, provided by the user
    config.train.update(
        batch_size=batch_size,
        microbatches=microbatches,
        seq_len=4096,
        learning_rate=learning_rate,
        warmup_steps=2000,
        z_loss_weight=3.5e-6,
    )
    config.train.batch_ramp.update(start=RAMP_START, tokens=RAMP_TOKENS)
    return config


RAMP_START = 3024  # sequences of 4K at the start of pre-training (../shared/docs/ling2-spec.md)
RAMP_TOKENS = 500e9  # "over roughly the first 500B tokens"
EXTENSION_THETA = 600000.0  # RoPE theta from the 32K stage on
EXTENSION_BIAS_RATE = 1e-4  # the aux-loss-free bias rate after context extension
YARN_FACTOR = 4.0  # 128K = YaRN factor 4 over an original 32,768
YARN_ORIGINAL = 32768


def context_stage(
    config: ml_collections.ConfigDict,
    *,
    seq_len: int,
    batch_size: int,
    microbatches: int,
    tokens: float | None,
    yarn: bool,
    mesh: dict[str, int],
) -> ml_collections.ConfigDict:
    """A context-extension stage of a 4K preset `config` (changed in place and returned): sequences
    of `seq_len`, RoPE theta 600k, YaRN factor 4 over 32,768 when `yarn` (the 128K stage), the bias
    rate 1e-4, no batch ramp, splash attention with the sequence split over `mesh`'s context axis.
    `tokens` (the stage's budget, when the report gives one) sets train.steps. Started from the
    previous stage's run with `ling-jax train --init PREV_WORKDIR` (a fresh optimizer, so a short
    warmup of our choosing: the report does not give one)."""
    config.model.update(
        rope_theta=EXTENSION_THETA, max_position_embeddings=seq_len, attention_impl="splash", remat_policy="full"
    )
    if yarn:
        config.model.rope_scaling.update(factor=YARN_FACTOR, original_max_position_embeddings=YARN_ORIGINAL)
    config.train.update(
        seq_len=seq_len,
        batch_size=batch_size,
        microbatches=microbatches,
        bias_update_rate=EXTENSION_BIAS_RATE,
        warmup_steps=50,
    )
    if tokens:
        config.train.steps = math.ceil(tokens / (batch_size * seq_len))
    config.train.batch_ramp.update(start=0, tokens=0.0)
    config.mesh.update(mesh)
    return config


def experiment_from_config(config: ml_collections.ConfigDict | Mapping) -> Experiment:
    """The validated Experiment of a config (a config file's `get_config()`, or config.json's mapping).

    Raises ConfigError naming the first bad field (`.field`, e.g. "train.b1") before anything runs."""
    if isinstance(config, ml_collections.ConfigDict):
        values = config.to_dict()
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise ConfigError(
            "config", f"must be an ml_collections.ConfigDict (what get_config() returns), got {type(config).__name__}"
        )
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    for name in _SECTIONS:
        if not isinstance(values.get(name, {}), Mapping):
            raise ConfigError(name, f"must be a section of fields (a ConfigDict), got {type(values[name]).__name__}")
    model = dict(values.get("model", {}))
    scaling = model.get("rope_scaling")
    if isinstance(scaling, Mapping) and not scaling.get("factor"):
        model["rope_scaling"] = None
    values["model"] = model
    return Experiment(**{name: _build(cls, name, values.get(name, {})) for name, cls in _SECTIONS.items()})
