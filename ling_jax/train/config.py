"""The one place where an ml_collections ConfigDict becomes frozen dataclasses.

Preset files in configs/ start from `base_config()` and change fields; `experiment_from_config`
validates every section (unknown keys are errors naming them) and returns an `Experiment`.
Code below this module never sees the ConfigDict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from ling_jax.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (the Python standard library's own sources) or .txt/.jsonl paths
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    heldout_fraction: float = 0.02
    max_tokens: int = 0  # 0 = the whole corpus

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.max_tokens < 0:
            raise ConfigError(f"data.max_tokens must be >= 0, got {self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    seed: int = 0
    batch_size: int = 16  # global, in sequences
    seq_len: int = 128
    learning_rate: float = 3e-3  # WSM: peak, held constant after warmup
    warmup_steps: int = 30
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
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
    sample_temperature: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"train.seq_len must be >= 2, got {self.seq_len}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if self.bias_update_rate < 0:
            raise ConfigError(f"train.bias_update_rate must be >= 0, got {self.bias_update_rate}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (0 = only the final one)
    keep: int = 8  # checkpoints kept: the WSM merge window plus one
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh; the product must equal the device count. One axis may be -1 (the rest)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    model: int = 1

    @property
    def axes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "model": self.model}

    def __post_init__(self):
        sizes = self.axes
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
        for name, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{name} must be a positive size or -1, got {v}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "mesh": MeshConfig,
}


def _build(cls, section: str, values: Mapping[str, Any]):
    if cls is ModelConfig:
        try:
            return ModelConfig.from_mapping(values)
        except ConfigError as e:
            message = str(e)
            prefix = "unknown model config field(s): "
            if message.startswith(prefix):  # name them as the user wrote them: model.<key>
                names = message[len(prefix) :].split(", ")
                raise ConfigError(f"unknown model config field(s): {', '.join(f'model.{n}' for n in names)}") from None
            raise ConfigError(f"model.{message}") from None
        except TypeError as e:  # an unknown key inside model.rope_scaling
            raise ConfigError(f"model.rope_scaling: {e}") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} config field(s): {', '.join(f'{section}.{u}' for u in unknown)}")
    return cls(**values)


def base_config() -> ml_collections.ConfigDict:
    """Every section at its defaults (model: Ling-mini-2.0's shape)."""
    config = ml_collections.ConfigDict()
    for name, cls in _SECTIONS.items():
        fields = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
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
) -> ml_collections.ConfigDict:
    """A published Ling 2.0 size: what all three share (../shared/docs/ling2-spec.md) plus its shape
    and its pre-training batch (sequences of 4K) and peak LR from the report."""
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
        batch_size=batch_size, seq_len=4096, learning_rate=learning_rate, warmup_steps=2000, z_loss_weight=3.5e-6
    )
    return config


def experiment_from_config(config: ml_collections.ConfigDict | Mapping) -> Experiment:
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    model = dict(values.get("model", {}))
    scaling = model.get("rope_scaling")
    if isinstance(scaling, Mapping) and not scaling.get("factor"):
        model["rope_scaling"] = None
    values["model"] = model
    return Experiment(**{name: _build(cls, name, values.get(name, {})) for name, cls in _SECTIONS.items()})
