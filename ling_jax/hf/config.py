"""HF BailingMoeV2 config.json <-> ModelConfig.

Reading is strict: a field of the wrong type (a size of 64.7, a flag of "false"), an unknown
`torch_dtype` or another `model_type` is an error naming the file and the field, never a silent
conversion, since a checkpoint loaded under a wrong config computes something else without failing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ling_jax.config import DTYPES, ConfigError, ModelConfig, RopeScaling

MODEL_TYPE = "bailing_moe_v2"
_REQUIRED = object()


class _Fields:
    """Typed reads of one config.json mapping; every error names the source and the field.

    An absent key or a JSON null reads as the default; with no default it is an error.
    """

    def __init__(self, raw: Any, source: str, prefix: str = ""):
        if not isinstance(raw, Mapping):
            what = f"{prefix[:-1]} must be a JSON object" if prefix else "must hold a JSON object"
            raise ConfigError(f"{source}: {what}, got {type(raw).__name__}")
        self.raw, self.source, self.prefix = raw, source, prefix

    def error(self, key: str, text: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}={self.raw.get(key)!r}: {text}")

    def get(self, key: str, default=_REQUIRED):
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: missing field {self.prefix}{key}")
            return default
        return value

    def int(self, key: str, default=_REQUIRED):
        value = self.get(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(key, "must be an integer")
        return value

    def float(self, key: str, default=_REQUIRED):
        value = self.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(key, "must be a finite number")
        return float(value)

    def bool(self, key: str, default=_REQUIRED):
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def token_id(self, key: str):
        value = self.get(key, None)
        if isinstance(value, list):  # HF allows a list of ids; the model uses the first
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise self.error(key, "must be an integer, a list of integers or null")
            return value[0] if value else None
        return self.int(key, None)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Reads the fields of a BailingMoeV2 config.json; unsupported or mistyped settings are
    ConfigErrors naming `source` and the field."""
    f = _Fields(hf, source)
    if f.get("model_type", None) != MODEL_TYPE:
        raise f.error("model_type", f"only {MODEL_TYPE!r} (BailingMoeV2) checkpoints are supported")
    if f.get("hidden_act", "silu") != "silu":
        raise f.error("hidden_act", "only 'silu' (SwiGLU) is supported")
    if f.get("score_function", "sigmoid") != "sigmoid":
        raise f.error("score_function", "only 'sigmoid' is supported")
    if hf.get("num_experts") is None:
        raise ConfigError(f"{source}: no num_experts: not a BailingMoeV2 MoE config")
    dtype_key = "torch_dtype" if hf.get("torch_dtype") is not None else "dtype"  # newer transformers: "dtype"
    dtype = f.get(dtype_key, "float32")
    if dtype not in DTYPES:
        raise f.error(dtype_key, f"supported: {', '.join(DTYPES)}")
    num_heads = f.int("num_attention_heads")
    hidden_size = f.int("hidden_size")
    max_positions = f.int("max_position_embeddings", 32768)
    try:
        return ModelConfig(
            vocab_size=f.int("vocab_size"),
            hidden_size=hidden_size,
            num_layers=f.int("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=f.int("num_key_value_heads", 0) or num_heads,
            head_dim=f.int("head_dim", 0) or hidden_size // num_heads,
            intermediate_size=f.int("intermediate_size"),
            num_experts=f.int("num_experts"),
            num_experts_per_tok=f.int("num_experts_per_tok"),
            n_group=f.int("n_group", 0) or 1,
            topk_group=f.int("topk_group", 0) or 1,
            num_shared_experts=f.int("num_shared_experts", 0),
            moe_intermediate_size=f.int("moe_intermediate_size"),
            first_k_dense_replace=f.int("first_k_dense_replace", 0),
            routed_scaling_factor=f.float("routed_scaling_factor", 1.0),
            partial_rotary_factor=f.float("partial_rotary_factor", 1.0),
            rope_theta=f.float("rope_theta", 10000.0),
            rope_scaling=_rope_scaling(f, max_positions),
            max_position_embeddings=max_positions,
            use_qk_norm=f.bool("use_qk_norm", False),
            use_qkv_bias=f.bool("use_qkv_bias", False),
            use_bias=f.bool("use_bias", False),
            num_mtp_layers=f.int("num_nextn_predict_layers", 0),
            mtp_loss_weight=f.float("mtp_loss_scaling_factor", 0.0),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            eos_token_id=f.token_id("eos_token_id"),
            pad_token_id=f.token_id("pad_token_id"),
            init_std=f.float("initializer_range", 0.0) or ModelConfig.init_std,
            param_dtype=dtype,
            dtype=dtype,
        )
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        raise ConfigError(f"{source}: {e}") from None


def _rope_scaling(f: _Fields, max_positions: int) -> RopeScaling | None:
    raw = f.get("rope_scaling", None)
    if raw is None:
        return None
    s = _Fields(raw, f.source, "rope_scaling.")
    kind = s.get("rope_type", None) or s.get("type", None)
    if kind not in ("yarn", "default"):
        raise ConfigError(f"{f.source}: rope_scaling type {kind!r}: only 'yarn' is supported")
    if kind == "default":
        return None
    optional = {key: s.float(key, None) for key in ("mscale", "mscale_all_dim", "attention_factor")}
    return RopeScaling(
        factor=s.float("factor"),
        original_max_position_embeddings=s.int("original_max_position_embeddings", 0) or max_positions,
        beta_fast=s.float("beta_fast", 0.0) or 32.0,
        beta_slow=s.float("beta_slow", 0.0) or 1.0,
        truncate=s.bool("truncate", True),
        **optional,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json a BailingMoeV2 checkpoint of this config carries."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
            "rope_type": "yarn",
        }
        if (s.beta_fast, s.beta_slow) != (32.0, 1.0):
            rope_scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(s, key) is not None:
                rope_scaling[key] = getattr(s, key)
        if not s.truncate:
            rope_scaling["truncate"] = False
    return {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "num_shared_experts": cfg.num_shared_experts,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_qk_norm": cfg.use_qk_norm,
        "use_qkv_bias": cfg.use_qkv_bias,
        "use_bias": cfg.use_bias,
        "num_nextn_predict_layers": cfg.num_mtp_layers,
        "mtp_loss_scaling_factor": cfg.mtp_loss_weight,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": cfg.init_std,
        "torch_dtype": cfg.param_dtype,
    }


def read_config(path: Path) -> ModelConfig:
    """The ModelConfig of checkpoint directory `path`; a missing, unreadable or invalid config.json
    is an error naming the file (and the field)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    try:
        raw = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return config_from_hf(raw, source=str(file))


def write_config(cfg: ModelConfig, path: Path) -> None:
    with open(Path(path) / "config.json", "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
