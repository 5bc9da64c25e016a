"""The experiment config: unknown sections and keys are errors naming them, values are validated,
the mesh shape is resolved against the device count, and bad configs stop `ling-jax train` with
exit code 2 and a message naming the field before anything is compiled."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import pytest
from jax.sharding import AbstractMesh
from multidevice.common import REPO_ROOT, small_config, train_cli

from ling_jax.config import ConfigError
from ling_jax.sharding import MESH_AXES, build_mesh, resolve_mesh_shape
from ling_jax.train.config import Experiment, MeshConfig, base_config, experiment_from_config
from ling_jax.train.loop import check_batch_layout, experiment_to_dict


# --------------------------------------------------------------------------- experiment_from_config
def test_base_config_builds_the_defaults():
    exp = experiment_from_config(base_config())
    assert isinstance(exp, Experiment)
    assert exp.model.rope_scaling is None  # factor 0 in the ConfigDict means "no rope scaling"
    assert exp.mesh.axes == {"data": -1, "fsdp": 1, "expert": 1, "context": 1, "model": 1}


@pytest.mark.parametrize("preset", ["tiny", "ling_mini_2", "ling_flash_2", "ling_1t"])
def test_presets_build(preset):
    spec = importlib.util.spec_from_file_location(preset, REPO_ROOT / "configs" / f"{preset}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exp = experiment_from_config(module.get_config())
    assert exp.model.num_moe_layers > 0


@pytest.mark.parametrize(
    "config, named",
    [
        ({"bogus": {}}, ["bogus"]),
        ({"train": {"bogus": 1}}, ["train.bogus"]),
        ({"data": {"max_token": 5}}, ["data.max_token"]),
        ({"checkpoint": {"evry": 5}}, ["checkpoint.evry"]),
        ({"mesh": {"tensor": 2}}, ["mesh.tensor"]),
        ({"model": {"hiden_size": 8, "zz": 1}}, ["model.hiden_size", "model.zz"]),
        (
            {"model": {"rope_scaling": {"factor": 2.0, "original_max_position_embeddings": 8, "oops": 1}}},
            ["model.rope_scaling", "oops"],
        ),
    ],
)
def test_unknown_sections_and_keys_are_named(config, named):
    with pytest.raises(ConfigError) as info:
        experiment_from_config(config)
    for name in named:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "config, named",
    [
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"batch_size": -1}}, "train.batch_size"),
        ({"train": {"seq_len": 1}}, "train.seq_len"),
        ({"train": {"learning_rate": 0.0}}, "train.learning_rate"),
        ({"train": {"bias_update_rate": -1e-3}}, "train.bias_update_rate"),
        ({"train": {"max_nonfinite_steps": 0}}, "train.max_nonfinite_steps"),
        ({"data": {"heldout_fraction": 1.0}}, "data.heldout_fraction"),
        ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
        ({"checkpoint": {"every": -1}}, "checkpoint.every"),
        ({"mesh": {"data": -1, "fsdp": -1}}, "at most one axis may be -1"),
        ({"mesh": {"expert": 0}}, "mesh.expert"),
        ({"model": {"hidden_size": 0}}, "model.hidden_size"),
        ({"model": {"num_heads": 3, "num_kv_heads": 2}}, "model.num_heads"),
    ],
)
def test_bad_values_are_named(config, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        experiment_from_config(config)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "section, key, value, match",
    [  # every field of the train / data / checkpoint / mesh sections: a wrong type and an unusable value
        ("train", "grad_clip", -1.0, r"must be positive, got -1.0"),
        ("train", "grad_clip", 0.0, r"must be positive, got 0.0"),
        ("train", "b1", 2.0, r"must be in \[0, 1\), got 2.0"),
        ("train", "b1", 1.0, r"must be in \[0, 1\), got 1.0"),
        ("train", "b2", -1.0, r"must be in \[0, 1\), got -1.0"),
        ("train", "b2", -0.5, r"must be in \[0, 1\), got -0.5"),
        ("train", "eps", 0.0, r"must be positive, got 0.0"),
        ("train", "weight_decay", -0.1, r"must be >= 0, got -0.1"),
        ("train", "z_loss_weight", -1e-6, r"must be >= 0, got -1e-06"),
        ("train", "peak_flops_per_device", -1.0, r"must be positive \(or 0: measure"),
        ("train", "sample_temperature", -0.7, r"must be >= 0, got -0.7"),
        ("train", "sample_temperature", NAN, r"must be a finite number, got nan"),
        ("train", "learning_rate", NAN, r"must be a finite number, got nan"),
        ("train", "learning_rate", INF, r"must be a finite number, got inf"),
        ("train", "learning_rate", 0.0, r"must be positive"),
        ("train", "learning_rate", "3e-3", r"must be a number, got str '3e-3'"),
        ("train", "b1", None, r"must be a number, got NoneType None"),
        ("train", "bias_update_rate", -1e-3, r"must be >= 0"),
        ("train", "steps", 0, r"must be positive, got 0"),
        ("train", "steps", 10.5, r"must be an integer, got float 10.5"),
        ("train", "steps", True, r"must be an integer, got bool True"),
        ("train", "seed", -1, r"must be >= 0, got -1"),
        ("train", "batch_size", -1, r"must be positive"),
        ("train", "seq_len", 1, r"must be >= 2"),
        ("train", "warmup_steps", -1, r"must be >= 0"),
        ("train", "log_every", 0, r"must be positive"),
        ("train", "eval_every", -1, r"must be >= 0"),
        ("train", "eval_batches", -2, r"must be >= 0"),
        ("train", "max_nonfinite_steps", 0, r"must be positive"),
        ("train", "sample_tokens", -1, r"must be >= 0"),
        ("train", "sample_prompt", 3, r"must be a string, got int 3"),
        ("data", "source", "", r"must be a non-empty string"),
        ("data", "source", None, r"must be a string"),
        ("data", "tokenizer", "  ", r"must be a non-empty string"),
        ("data", "heldout_fraction", 1.0, r"must be in \[0, 1\)"),
        ("data", "heldout_fraction", NAN, r"must be a finite number"),
        ("data", "max_tokens", -1, r"must be >= 0"),
        ("data", "max_tokens", 1e6, r"must be an integer, got float"),
        ("checkpoint", "every", -1, r"must be >= 0"),
        ("checkpoint", "keep", 0, r"must be >= 1"),
        ("checkpoint", "async_save", "yes", r"must be a bool"),
        ("mesh", "expert", 0, r"must be a positive size or -1"),
        ("mesh", "model", -2, r"must be a positive size or -1"),
        ("mesh", "data", 2.0, r"must be an integer"),
        ("mesh", "fsdp", -1, r"is -1 like mesh.data: at most one axis may be -1"),
    ],
)
def test_every_bad_setting_is_a_config_error_naming_the_field(section, key, value, match):
    values = small_config().to_dict()  # a dict: ConfigDict itself refuses some wrong types on assignment
    values[section][key] = value
    with pytest.raises(ConfigError, match=match) as info:
        experiment_from_config(values)
    assert info.value.field == f"{section}.{key}"
    assert str(info.value).startswith(f"{section}.{key} ")


def test_seq_len_must_fit_the_position_embeddings():
    values = small_config(train={"seq_len": 65}).to_dict()  # small model: max_position_embeddings=64
    with pytest.raises(ConfigError, match=r"train.seq_len \(65\) must be <= model.max_position_embeddings \(64\)"):
        experiment_from_config(values)
    assert experiment_from_config(small_config(train={"seq_len": 64})).train.seq_len == 64


def test_float_fields_take_ints():
    exp = experiment_from_config(small_config(train={"grad_clip": 2, "weight_decay": 0}))
    assert exp.train.grad_clip == 2 and exp.train.weight_decay == 0


@pytest.mark.parametrize("rope_scaling", [None, {"factor": 4.0, "original_max_position_embeddings": 16}])
def test_config_json_round_trip(rope_scaling):
    """run() writes experiment_to_dict(exp) to config.json; eval/merge rebuild the same Experiment."""
    config = small_config(train={"steps": 7}, mesh={"data": 1})
    if rope_scaling:
        config.model.rope_scaling.update(rope_scaling)
    exp = experiment_from_config(config)
    assert (exp.model.rope_scaling is None) == (rope_scaling is None)
    again = experiment_from_config(experiment_to_dict(exp))
    assert again == exp


# --------------------------------------------------------------------------- mesh
def test_mesh_config_minus_one_resolution():
    assert resolve_mesh_shape(MeshConfig().axes, 8) == {"data": 8, "fsdp": 1, "expert": 1, "context": 1, "model": 1}
    assert resolve_mesh_shape(MeshConfig(data=-1, expert=2, model=2).axes, 8) == {
        "data": 2,
        "fsdp": 1,
        "expert": 2,
        "context": 1,
        "model": 2,
    }
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1, expert=2).axes, 8) == {
        "data": 2,
        "fsdp": 2,
        "expert": 2,
        "context": 1,
        "model": 1,
    }
    assert resolve_mesh_shape(MeshConfig(data=1, fsdp=4, expert=2).axes, 8) == {
        "data": 1,
        "fsdp": 4,
        "expert": 2,
        "context": 1,
        "model": 1,
    }


def test_resolve_mesh_shape_errors():
    with pytest.raises(ConfigError, match=r"mesh\.data=-1.*3.*8 devices"):
        resolve_mesh_shape({"data": -1, "fsdp": 3, "expert": 1, "model": 1}, 8)
    with pytest.raises(ConfigError, match=r"mesh product 4 .*mesh\.data=2.*mesh\.model=2.*\(8\)"):
        resolve_mesh_shape({"data": 2, "fsdp": 1, "expert": 1, "model": 2}, 8)
    with pytest.raises(ConfigError, match=r"mesh product 16"):
        resolve_mesh_shape({"data": 2, "fsdp": 4, "expert": 2, "model": 1}, 8)


def test_build_mesh_uses_every_device_with_auto_axes():
    mesh = build_mesh(MeshConfig().axes)
    assert mesh.axis_names == MESH_AXES
    assert mesh.shape["data"] == jax.device_count() and mesh.size == jax.device_count()
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ConfigError, match="mesh product"):
        build_mesh({"data": jax.device_count() + 1, "fsdp": 1, "expert": 1, "model": 1})


def test_batch_must_divide_over_the_batch_axes():
    exp = experiment_from_config(small_config(train={"batch_size": 12}))
    mesh = AbstractMesh((8, 1, 1, 1, 1), MESH_AXES)
    with pytest.raises(ConfigError, match=r"train\.batch_size=12 .*mesh\.data x mesh\.fsdp x mesh\.expert = 8"):
        check_batch_layout(exp, mesh)
    check_batch_layout(dataclasses.replace(exp, train=dataclasses.replace(exp.train, batch_size=16)), mesh)
    # 'model' does not split the batch: 12 rows over data=2 x model=4 is fine.
    check_batch_layout(exp, AbstractMesh((2, 1, 1, 1, 4), MESH_AXES))
    with pytest.raises(ConfigError, match=r"= 8"):
        check_batch_layout(exp, AbstractMesh((1, 2, 4, 1, 1), MESH_AXES))


# --------------------------------------------------------------------------- through the CLI
def _fails_before_compiling(proc, *names: str):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in names:
        assert name in proc.stderr, proc.stderr[-3000:]
    assert "Compiling" not in proc.stderr, "something was compiled before the config error"


def test_cli_unknown_key_exits_2_naming_it(tmp_path):
    proc = train_cli(tmp_path / "run", "--config.train.bogus=1", check=False, env={"JAX_LOG_COMPILES": "1"})
    _fails_before_compiling(proc, "ling-jax train:", "config.train.bogus")
    assert not (tmp_path / "run").exists()


def test_cli_mesh_product_must_equal_device_count(tmp_path):
    proc = train_cli(tmp_path / "run", mesh={"data": 2, "model": 2}, check=False, env={"JAX_LOG_COMPILES": "1"})
    _fails_before_compiling(proc, "mesh product 4", "mesh.data=2", "number of devices (1)")


def test_cli_batch_not_divisible_by_data_axes(tmp_path):
    proc = train_cli(
        tmp_path / "run",
        train={"batch_size": 12},
        mesh={"data": 8},
        num_devices=8,
        check=False,
        env={"JAX_LOG_COMPILES": "1"},
    )
    _fails_before_compiling(proc, "train.batch_size=12", "= 8")


def test_cli_vocab_smaller_than_tokenizer(tmp_path):
    proc = train_cli(
        tmp_path / "run", model={"vocab_size": 257, "pad_token_id": 0}, check=False, env={"JAX_LOG_COMPILES": "1"}
    )
    _fails_before_compiling(proc, "model.vocab_size=257", "(258", "data.tokenizer='byte'")


@pytest.mark.parametrize(
    "train, named",
    [
        ({"b2": -1.0}, "train.b2 must be in [0, 1), got -1.0"),
        ({"seq_len": 65}, "train.seq_len (65) must be <= model.max_position_embeddings (64)"),
    ],
    ids=["negative-b2", "seq-len-above-positions"],
)
def test_cli_bad_training_settings_exit_2_before_compiling(tmp_path, train, named):
    proc = train_cli(tmp_path / "run", train=train, check=False, env={"JAX_LOG_COMPILES": "1"})
    _fails_before_compiling(proc, "ling-jax train: config error:", named)
    assert not (tmp_path / "run").exists()
