"""ModelConfig validation (every error names its field), the ml_collections -> dataclass factory
(`experiment_from_config`), and the presets in configs/."""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
from pathlib import Path

import ml_collections
import pytest

from ling_jax.config import ConfigError, ModelConfig, RopeScaling, UnknownFieldsError
from ling_jax.train.config import Experiment, base_config, experiment_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.py"))


def _valid(**changes) -> dict:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=16,
        max_position_embeddings=64,
    )
    base.update(changes)
    return base


def test_valid_config_and_derived_values():
    cfg = ModelConfig(**_valid(partial_rotary_factor=0.5, num_shared_experts=2, first_k_dense_replace=5))
    assert cfg.rotary_dim == 4
    assert cfg.experts_per_group == 2
    assert cfg.shared_intermediate_size == 32
    assert (cfg.num_dense_layers, cfg.num_moe_layers) == (3, 0)  # first_k_dense_replace clipped to depth
    assert cfg.replace(num_layers=6).num_moe_layers == 1
    assert ModelConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 4


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"),
        (dict(num_experts=10, n_group=4), r"num_experts \(10\) must be divisible by n_group \(4\)"),
        (dict(topk_group=5), r"topk_group \(5\) must be <= n_group \(4\)"),
        (dict(num_experts_per_tok=5), r"num_experts_per_tok \(5\) exceeds the experts in the kept groups"),
        (
            dict(num_experts=4, n_group=4, topk_group=2, num_experts_per_tok=1),
            r"n_group \(4\) leaves 1 expert\(s\) per group.*each group needs >= 2",
        ),
        (
            dict(head_dim=6, partial_rotary_factor=0.5),
            r"partial_rotary_factor 0.5 x head_dim 6 gives an odd rotary dim 3",
        ),
        (dict(head_dim=8, partial_rotary_factor=0.3), r"partial_rotary_factor 0.3 x head_dim 8 is not an integer"),
        (dict(partial_rotary_factor=0.0), r"partial_rotary_factor must be in \(0, 1\]"),
        (dict(partial_rotary_factor=1.5), r"partial_rotary_factor must be in \(0, 1\]"),
        (dict(dtype="float64"), r"dtype must be one of .*got 'float64'"),
        (dict(param_dtype="bf16"), r"param_dtype must be one of .*got 'bf16'"),
        (dict(remat_policy="everything"), r"remat_policy must be one of .*got 'everything'"),
        (dict(moe_dispatch="megablox"), r"moe_dispatch must be one of .*got 'megablox'"),
        (dict(router_impl="triton"), r"router_impl must be one of .*got 'triton'"),
        (dict(moe_capacity_factor=-1.0), r"moe_capacity_factor must be >= 0 \(0: dropless\), got -1.0"),
        (dict(moe_capacity_factor=float("nan")), r"moe_capacity_factor must be a finite number, got nan"),
        (dict(eos_token_id=64), r"eos_token_id \(64\) must be in \[0, vocab_size=64\)"),
        (dict(pad_token_id=-1), r"pad_token_id \(-1\) must be in \[0, vocab_size=64\)"),
        (dict(hidden_size=-32), r"hidden_size must be a positive integer, got -32"),
        (dict(vocab_size=0), r"vocab_size must be a positive integer, got 0"),
        (dict(num_layers=2.5), r"num_layers must be a positive integer, got 2.5"),
        (dict(num_heads=True), r"num_heads must be a positive integer, got True"),
        (dict(max_position_embeddings=-1), r"max_position_embeddings must be a positive integer"),
        (dict(num_shared_experts=-1), r"num_shared_experts must be a non-negative integer, got -1"),
        (dict(first_k_dense_replace=-2), r"first_k_dense_replace must be a non-negative integer, got -2"),
        (dict(num_mtp_layers=-1), r"num_mtp_layers must be a non-negative integer, got -1"),
        (dict(rope_theta=0.0), r"rope_theta must be positive, got 0.0"),
        (dict(rms_norm_eps=-1e-6), r"rms_norm_eps must be positive"),
        (dict(mtp_loss_weight=-0.1), r"mtp_loss_weight must be >= 0, got -0.1"),
        (dict(rope_scaling={"factor": 4.0}), r"rope_scaling must be a RopeScaling or None"),
        (dict(routed_scaling_factor=0.0), r"routed_scaling_factor must be positive, got 0.0"),
        (dict(init_std=-0.02), r"init_std must be positive, got -0.02"),
    ],
)
def test_model_config_errors_name_the_field(changes, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**_valid(**changes))


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(factor=0.5, original_max_position_embeddings=64), r"rope_scaling.factor must be >= 1, got 0.5"),
        (dict(factor=4.0, original_max_position_embeddings=0), r"rope_scaling.original_max_position_embeddings"),
        (dict(factor=4.0, original_max_position_embeddings=64, rope_type="linear"), r"rope_scaling.rope_type"),
        (
            dict(factor=4.0, original_max_position_embeddings=64, beta_fast=1.0, beta_slow=2.0),
            r"rope_scaling.beta_fast must be > beta_slow > 0, got beta_fast=1.0, beta_slow=2.0",
        ),
    ],
)
def test_rope_scaling_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        RopeScaling(**fields)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_from_mapping_rejects_unknown_fields_and_builds_rope_scaling():
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\): hiden_size, num_expert"):
        ModelConfig.from_mapping(_valid(hiden_size=3, num_expert=2))
    cfg = ModelConfig.from_mapping(_valid(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 16}))
    assert cfg.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=16)


# --------------------------------------------------------------------------- experiment_from_config
def test_experiment_from_base_config():
    exp = experiment_from_config(base_config())
    assert isinstance(exp, Experiment)
    assert exp.model == ModelConfig()  # the base model section is ModelConfig's defaults
    assert exp.model.rope_scaling is None  # factor 0 in the ConfigDict means "no scaling"


def test_experiment_from_config_builds_rope_scaling():
    config = base_config()
    config.model.rope_scaling.factor = 4.0
    config.model.rope_scaling.original_max_position_embeddings = 8192
    config.model.max_position_embeddings = 32768
    assert experiment_from_config(config).model.rope_scaling == RopeScaling(4.0, 8192)


@pytest.mark.parametrize(
    "section,key",
    [
        ("model", "hiden_size"),
        ("train", "learning_rat"),
        ("data", "tokenzier"),
        ("checkpoint", "evry"),
        ("mesh", "tensor"),
    ],
)
def test_experiment_from_config_rejects_unknown_keys(section, key):
    values = base_config().to_dict()
    values[section][key] = 1
    with pytest.raises(ConfigError, match=key) as info:
        experiment_from_config(values)
    assert "unknown" in str(info.value)


def test_experiment_from_config_rejects_unknown_sections():
    values = base_config().to_dict()
    values["optimiser"] = {"lr": 1.0}
    with pytest.raises(ConfigError, match=r"unknown config section\(s\): optimiser"):
        experiment_from_config(values)


def test_experiment_from_config_validates_sections():
    config = base_config()
    config.model.num_kv_heads = 3
    with pytest.raises(ConfigError, match="num_kv_heads"):
        experiment_from_config(config)
    config = base_config()
    config.train.seq_len = 1
    with pytest.raises(ConfigError, match=r"train.seq_len must be >= 2"):
        experiment_from_config(config)


# --------------------------------------------------------------------------- presets
def _load_preset(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"ling_preset_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_presets_exist():
    assert {"tiny", "ling_mini_2", "ling_flash_2", "ling_1t"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name):
    config = _load_preset(name)
    if "sft" in config:  # post-training presets: their own section beside the experiment's
        from ling_jax.posttrain.sft import split_config

        exp = split_config(config)[0]
    elif "rl" in config:
        from ling_jax.rl.config import rl_from_config

        exp = rl_from_config(config)[0]
    else:
        exp = experiment_from_config(config)
    cfg = exp.model
    cfg.validate()
    assert cfg.rotary_dim % 2 == 0 and cfg.num_heads % cfg.num_kv_heads == 0
    if name.startswith("ling_"):  # the published Ling 2.0 family shape
        assert (cfg.vocab_size, cfg.num_experts, cfg.num_experts_per_tok) == (157184, 256, 8)
        assert (cfg.n_group, cfg.topk_group, cfg.num_shared_experts, cfg.head_dim) == (8, 4, 1, 128)
        assert cfg.partial_rotary_factor == 0.5 and cfg.use_qk_norm and not cfg.tie_word_embeddings
        assert cfg.routed_scaling_factor == 2.5 and cfg.num_mtp_layers == 1
    if name == "tiny":
        assert cfg.vocab_size == 258 and (cfg.eos_token_id, cfg.pad_token_id) == (256, 257)


@pytest.mark.parametrize("name", ["ling_mini_2", "ling_flash_2", "ling_1t"])
def test_published_shapes(name):
    shapes = {  # layers, hidden, heads, kv heads, dense FFN, expert FFN, leading dense layers
        "ling_mini_2": (20, 2048, 16, 4, 5120, 512, 1),
        "ling_flash_2": (32, 4096, 32, 4, 9216, 1024, 1),
        "ling_1t": (80, 8192, 64, 8, 18432, 2048, 4),
    }
    cfg = experiment_from_config(_load_preset(name)).model
    assert (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.moe_intermediate_size,
        cfg.first_k_dense_replace,
    ) == shapes[name]


# --------------------------------------------------------------------------- field types, .field
@pytest.mark.parametrize(
    "changes,field,match",
    [
        (dict(rope_theta="big"), "rope_theta", r"rope_theta must be a number, got str 'big'"),
        (dict(routed_scaling_factor=None), "routed_scaling_factor", r"must be a number, got NoneType None"),
        (dict(rms_norm_eps=True), "rms_norm_eps", r"must be a number, got bool True"),
        (dict(init_std=float("inf")), "init_std", r"init_std must be a finite number, got inf"),
        (dict(rope_theta=float("nan")), "rope_theta", r"rope_theta must be a finite number, got nan"),
        (dict(mtp_loss_weight=float("-inf")), "mtp_loss_weight", r"must be a finite number, got -inf"),
        (dict(use_qk_norm="yes"), "use_qk_norm", r"use_qk_norm must be a bool \(True or False\), got str 'yes'"),
        (dict(scan_layers=1), "scan_layers", r"scan_layers must be a bool"),
        (dict(eos_token_id=3.0), "eos_token_id", r"eos_token_id must be an integer or None, got float 3.0"),
        (dict(dtype=32), "dtype", r"dtype must be a string, got int 32"),
        (dict(num_experts="8"), "num_experts", r"num_experts must be a positive integer, got '8'"),
    ],
)
def test_model_config_type_errors_carry_the_field(changes, field, match):
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig(**_valid(**changes))
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_ints_are_numbers_for_float_fields():
    assert ModelConfig(**_valid(rope_theta=10000, routed_scaling_factor=2)).rope_theta == 10000


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(factor="4", original_max_position_embeddings=64), "rope_scaling.factor"),
        (dict(factor=4.0, original_max_position_embeddings=64.5), "rope_scaling.original_max_position_embeddings"),
        (dict(factor=float("nan"), original_max_position_embeddings=64), "rope_scaling.factor"),
        (dict(factor=4.0, original_max_position_embeddings=64, mscale=-1.0), "rope_scaling.mscale"),
        (dict(factor=4.0, original_max_position_embeddings=64, truncate="no"), "rope_scaling.truncate"),
    ],
)
def test_rope_scaling_type_errors_carry_the_field(fields, field):
    with pytest.raises(ConfigError) as info:
        RopeScaling(**fields)
    assert info.value.field == field


def test_config_error_carries_field_and_rehomes_it():
    e = ConfigError("rope_theta", "must be positive, got 0")
    assert (e.field, e.message, str(e)) == (
        "rope_theta",
        "must be positive, got 0",
        "rope_theta must be positive, got 0",
    )
    moved = e.within("model")
    assert (moved.field, str(moved)) == ("model.rope_theta", "model.rope_theta must be positive, got 0")
    plain = ConfigError("a message about no single field")
    assert plain.field is None and str(plain) == "a message about no single field"
    assert str(plain.within("model")) == "model: a message about no single field"
    for error in (e, plain, UnknownFieldsError(["model.zz"], "model")):
        again = pickle.loads(pickle.dumps(error))
        assert (type(again), again.field, str(again)) == (type(error), error.field, str(error))


def test_experiment_names_model_fields_from_the_root():
    """A config (file or config.json) with `model.rope_theta = "big"` is told about rope_theta, not rope_scaling."""
    config = base_config().to_dict()
    config["model"]["rope_theta"] = "big"
    with pytest.raises(ConfigError, match=r"^model\.rope_theta must be a number, got str 'big'$") as info:
        experiment_from_config(config)
    assert info.value.field == "model.rope_theta"
    config = base_config().to_dict()
    config["model"]["rope_scaling"] = {"factor": 4.0, "original_max_position_embeddings": "8k"}
    with pytest.raises(ConfigError) as info:
        experiment_from_config(config)
    assert info.value.field == "model.rope_scaling.original_max_position_embeddings"
    values = base_config().to_dict()
    values["model"]["rope_scaling"] = {"factor": 4.0}
    with pytest.raises(ConfigError, match="is required") as info:
        experiment_from_config(values)
    assert info.value.field == "model.rope_scaling.original_max_position_embeddings"


def test_unknown_fields_carry_every_name():
    with pytest.raises(UnknownFieldsError) as info:
        experiment_from_config({"model": {"hiden_size": 8, "zz": 1}})
    assert info.value.fields == ("model.hiden_size", "model.zz") and info.value.field == "model.hiden_size"


@pytest.mark.parametrize("returned", [5, None, "configs/tiny.py", [1, 2]])
def test_experiment_from_a_non_config_is_a_config_error(returned):
    with pytest.raises(ConfigError, match=r"config must be an ml_collections.ConfigDict") as info:
        experiment_from_config(returned)
    assert info.value.field == "config"


def test_a_section_that_is_not_a_mapping_is_named():
    values = base_config().to_dict()
    values["train"] = 3
    with pytest.raises(ConfigError, match=r"^train must be a section of fields"):
        experiment_from_config(values)
