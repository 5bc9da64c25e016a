"""ModelConfig: every BailingMoeV2 (Ling 2.0) hyper-parameter, frozen and self-validating.

Code below the config layer only ever sees this dataclass (never an ml_collections ConfigDict).
Derived values are properties. `validate()` runs in `__post_init__`, so an inconsistent config
cannot be constructed; each error names the offending field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "save_dots", "save_attn_out", "save_moe_out")
MOE_DISPATCHES = ("auto", "dense", "ragged", "blocked", "cpu_kernel")  # auto: see ling_jax/layers/moe.py
DTYPES = ("float32", "bfloat16", "float16")
FP8_MODES = ("off", "xla", "pallas")  # FP8 projections: off, the XLA reference path, the Pallas kernel
ROUTER_IMPLS = ("xla", "pallas")  # group-limited sigmoid top-k: lax.top_k, or the Pallas router kernel
# The attention core (ling_jax/ops/attention_impl.py): auto = splash on TPU, cudnn on GPU, xla elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")


class ConfigError(ValueError):
    """A config field holds a value that cannot be used.

    `ConfigError(field, message)` carries the field's name in `.field` (callers re-home it with
    `within(section)` instead of parsing text); `str(e)` is "<field> <message>", e.g.
    "train.b1 must be in [0, 1), got 2.0". `ConfigError(message)` is an error about no single field.
    """

    def __init__(self, field_or_message: str, message: str | None = None):
        if message is None:
            field, message = None, field_or_message
        else:
            field = field_or_message
        self.field = field
        self.message = message
        super().__init__(message if field is None else f"{field} {message}")

    def __reduce__(self):  # picklable (e.g. across processes) with its field
        return type(self), (self.message,) if self.field is None else (self.field, self.message)

    def within(self, section: str) -> ConfigError:
        """The same error with its field named from the experiment root (`rope_theta` -> `model.rope_theta`)."""
        if self.field is None:
            return ConfigError(f"{section}: {self.message}")
        return ConfigError(f"{section}.{self.field}", self.message)


class UnknownFieldsError(ConfigError):
    """Keys that are no field of a config section (a typo must never fall back to a default)."""

    def __init__(self, fields: Sequence[str], section: str):
        self.fields = tuple(fields)
        self.section = section
        super().__init__(f"unknown {section} config field(s): {', '.join(self.fields)}")
        self.field = self.fields[0]

    def __reduce__(self):
        return type(self), (self.fields, self.section)

    def within(self, section: str) -> UnknownFieldsError:
        return UnknownFieldsError([f"{section}.{f}" for f in self.fields], self.section)


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a bool (True or False)"}


def check_field_types(obj: Any, prefix: str = "") -> None:
    """Checks every int / float / str / bool field of the dataclass `obj` against its annotation
    (`X | None` also allows None). A float field takes any real number (an int too) but never NaN or
    inf; an int field never takes a bool. The error names the field (`prefix` + name) and the type."""
    for f in dataclasses.fields(obj):
        annotation = str(f.type).replace(" ", "")
        optional = annotation.endswith("|None")
        kind = annotation.removesuffix("|None")
        if kind not in _TYPE_NAMES:
            continue
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        if kind == "int":
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, bool)
        if not ok:
            expected = _TYPE_NAMES[kind] + (" or None" if optional else "")
            raise ConfigError(f"{prefix}{f.name}", f"must be {expected}, got {type(value).__name__} {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}", f"must be a finite number, got {value}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (HF `rope_scaling` with rope_type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    rope_type: str = "yarn"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        check_field_types(self, "rope_scaling.")
        if self.rope_type != "yarn":
            raise ConfigError(
                "rope_scaling.rope_type", f"must be 'yarn' (the only one supported), got {self.rope_type!r}"
            )
        if not self.factor >= 1.0:
            raise ConfigError("rope_scaling.factor", f"must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(
                "rope_scaling.original_max_position_embeddings",
                f"must be positive, got {self.original_max_position_embeddings}",
            )
        if not self.beta_fast > self.beta_slow > 0:
            raise ConfigError(
                "rope_scaling.beta_fast",
                f"must be > beta_slow > 0, got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}",
            )
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"rope_scaling.{name}", f"must be positive or None, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Ling 2.0 model. Names follow the HF BailingMoeV2 config where one exists."""

    vocab_size: int = 157184
    hidden_size: int = 2048
    num_layers: int = 20  # main stack only; MTP layers are counted in num_mtp_layers
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 5120  # dense SwiGLU width (layers < first_k_dense_replace)
    num_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    num_shared_experts: int = 1
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.5
    partial_rotary_factor: float = 0.5
    rope_theta: float = 600000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False  # bias of the attention output projection
    num_mtp_layers: int = 1
    mtp_loss_weight: float = 0.1
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    init_std: float = 0.006
    # Numerics and compilation.
    dtype: str = "float32"  # activation / matmul dtype; norms, router and softmax stay float32
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    moe_dispatch: str = (
        "auto"  # CPU: cpu_kernel (blocked where not built); fp8: blocked; else ragged (TPU, Hopper) or dense
    )
    # 0: dropless. > 0: expert-parallel buffers sized for cf x the mean load, drops counted in the train
    # metrics as moe_dropped (ling_jax/ops/expert_parallel.py); no effect without an expert mesh axis.
    moe_capacity_factor: float = 0.0
    fp8: str = "off"  # every linear layer except the router in blockwise FP8 (see ling_jax/ops/fp8.py)
    router_impl: str = "xla"  # pallas_kernels/topk_router impl; "pallas" = the kernel (interpreted on CPU)
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; the choice is made by ops/attention_impl.py

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def expert_capacity_factor(self) -> float | None:
        """`moe_capacity_factor` as the expert-parallel dispatch takes it: None (dropless) for 0."""
        return self.moe_capacity_factor or None

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raises ConfigError naming the first field with a wrong type or an unusable value."""
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "num_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "moe_intermediate_size",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        for name in ("num_shared_experts", "first_k_dense_replace", "num_mtp_layers"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {value!r}")
        check_field_types(self)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "num_heads", f"({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.head_dim * self.partial_rotary_factor != self.rotary_dim:
            raise ConfigError(
                "partial_rotary_factor", f"{self.partial_rotary_factor} x head_dim {self.head_dim} is not an integer"
            )
        if self.rotary_dim % 2:
            raise ConfigError(
                "partial_rotary_factor",
                f"{self.partial_rotary_factor} x head_dim {self.head_dim} gives an odd rotary dim "
                f"{self.rotary_dim}; RoPE rotates pairs",
            )
        if self.num_experts % self.n_group:
            raise ConfigError("num_experts", f"({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ConfigError("topk_group", f"({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.experts_per_group < 2:
            raise ConfigError(
                "n_group",
                f"({self.n_group}) leaves {self.experts_per_group} expert(s) per group of num_experts "
                f"({self.num_experts}); each group needs >= 2 (group score = sum of top-2)",
            )
        if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            raise ConfigError(
                "num_experts_per_tok",
                f"({self.num_experts_per_tok}) exceeds the experts in the kept groups "
                f"(topk_group {self.topk_group} x {self.experts_per_group} experts per group)",
            )
        if not self.rope_theta > 0:
            raise ConfigError("rope_theta", f"must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ConfigError("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if not self.mtp_loss_weight >= 0:
            raise ConfigError("mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")
        if not self.routed_scaling_factor > 0:
            raise ConfigError("routed_scaling_factor", f"must be positive, got {self.routed_scaling_factor}")
        if not self.init_std > 0:
            raise ConfigError("init_std", f"must be positive, got {self.init_std}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError("rope_scaling", f"must be a RopeScaling or None, got {type(self.rope_scaling)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(name, f"must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError("remat_policy", f"must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.moe_dispatch not in MOE_DISPATCHES:
            raise ConfigError("moe_dispatch", f"must be one of {MOE_DISPATCHES}, got {self.moe_dispatch!r}")
        if not self.moe_capacity_factor >= 0:
            raise ConfigError("moe_capacity_factor", f"must be >= 0 (0: dropless), got {self.moe_capacity_factor}")
        if self.fp8 not in FP8_MODES:
            raise ConfigError("fp8", f"must be one of {FP8_MODES}, got {self.fp8!r}")
        if self.router_impl not in ROUTER_IMPLS:
            raise ConfigError("router_impl", f"must be one of {ROUTER_IMPLS}, got {self.router_impl!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError("attention_impl", f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(name, f"({value}) must be in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a plain mapping (e.g. an ml_collections ConfigDict's `to_dict()`).

        Unknown keys are an error naming them, so a typo never silently falls back to a default.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UnknownFieldsError(unknown, "model")
        values = dict(fields)
        scaling = values.get("rope_scaling")
        if isinstance(scaling, Mapping):
            known = {f.name for f in dataclasses.fields(RopeScaling)}
            unknown = sorted(set(scaling) - known)
            if unknown:
                raise UnknownFieldsError([f"rope_scaling.{u}" for u in unknown], "model")
            missing = sorted(f.name for f in dataclasses.fields(RopeScaling) if f.default is dataclasses.MISSING)
            missing = [m for m in missing if m not in scaling]
            if missing:
                raise ConfigError(f"rope_scaling.{missing[0]}", "is required when rope_scaling is set")
            values["rope_scaling"] = RopeScaling(**dict(scaling))
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
