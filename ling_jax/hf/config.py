"""HF BailingMoeV2 config.json <-> ModelConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ling_jax.config import ConfigError, ModelConfig, RopeScaling

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Reads the fields of a BailingMoeV2 config.json; unsupported settings are errors naming the key."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("score_function", "sigmoid") != "sigmoid":
        raise ConfigError(f"config.json score_function={hf['score_function']!r}: only 'sigmoid' is supported")
    if hf.get("num_experts") is None:
        raise ConfigError("config.json has no num_experts: not a BailingMoeV2 MoE config")
    scaling = hf.get("rope_scaling")
    rope_scaling = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("yarn", "default"):
            raise ConfigError(f"config.json rope_scaling type {kind!r}: only 'yarn' is supported")
        if kind == "yarn":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                original_max_position_embeddings=int(
                    scaling.get("original_max_position_embeddings") or hf["max_position_embeddings"]
                ),
                beta_fast=float(scaling.get("beta_fast") or 32.0),
                beta_slow=float(scaling.get("beta_slow") or 1.0),
                mscale=scaling.get("mscale"),
                mscale_all_dim=scaling.get("mscale_all_dim"),
                attention_factor=scaling.get("attention_factor"),
                truncate=bool(scaling.get("truncate", True)),
            )
    num_heads = int(hf["num_attention_heads"])
    dtype = _DTYPES.get(hf.get("torch_dtype", "float32"), "float32")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        intermediate_size=int(hf["intermediate_size"]),
        num_experts=int(hf["num_experts"]),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        num_shared_experts=int(hf.get("num_shared_experts") or 0),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        first_k_dense_replace=int(hf.get("first_k_dense_replace", 0)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        partial_rotary_factor=float(hf.get("partial_rotary_factor", 1.0)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        use_qk_norm=bool(hf.get("use_qk_norm", False)),
        use_qkv_bias=bool(hf.get("use_qkv_bias", False)),
        use_bias=bool(hf.get("use_bias", False)),
        num_mtp_layers=int(hf.get("num_nextn_predict_layers") or 0),
        mtp_loss_weight=float(hf.get("mtp_loss_scaling_factor", 0.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_id=_single_id(hf.get("eos_token_id")),
        pad_token_id=_single_id(hf.get("pad_token_id")),
        init_std=float(hf.get("initializer_range") or ModelConfig.init_std),
        param_dtype=dtype,
        dtype=dtype,
    )


def _single_id(value):
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


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
        "model_type": "bailing_moe_v2",
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
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    with open(file) as f:
        return config_from_hf(json.load(f))


def write_config(cfg: ModelConfig, path: Path) -> None:
    with open(Path(path) / "config.json", "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
