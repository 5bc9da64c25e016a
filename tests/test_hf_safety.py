"""HF checkpoints against careless or hostile input: a save never deletes what it did not write,
files get the umask's permissions, variables the loader could not read back are refused, and
broken or malicious checkpoints (mixed-dtype stacks, overlapping offsets, an index pointing outside
the directory, a huge header, a bad config.json) are refused with an error naming the file and the
field or tensor."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ling_jax.config import ConfigError
from ling_jax.hf import CheckpointError, check_save_target, config_to_hf, load_checkpoint, save_checkpoint
from ling_jax.hf.checkpoint import INDEX_FILE, SINGLE_FILE


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(path / SINGLE_FILE, framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg, tiny_vars) -> Path:
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    save_checkpoint(tiny_cfg, tiny_vars, path)
    return path


def _copy_with(tmp_path: Path, saved: Path, tensors=None, config=None) -> Path:
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text((saved / "config.json").read_text() if config is None else config)
    if tensors is None:
        (out / SINGLE_FILE).write_bytes((saved / SINGLE_FILE).read_bytes())
    else:
        save_file(tensors, out / SINGLE_FILE)
    return out


# --------------------------------------------------------------------------- item 1: never delete
def _run_directory(root: Path) -> Path:
    """A directory shaped like a training run: its own config.json, checkpoints, metrics."""
    run = root / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "checkpoints" / "10" / "state").write_bytes(b"orbax bytes")
    (run / "config.json").write_text(json.dumps({"model": {"hidden_size": 32}, "train": {"steps": 30}}))
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n')
    return run


@pytest.mark.parametrize("layout", ["user_file", "run_directory", "checkpoint_plus_tokenizer", "subdirectory"])
def test_save_refuses_a_directory_with_foreign_files(tmp_path, tiny_cfg, tiny_vars, layout):
    if layout == "run_directory":
        target, foreign = _run_directory(tmp_path), ["checkpoints/", "config.json", "metrics.jsonl"]
    else:
        target = tmp_path / "target"
        target.mkdir()
        if layout == "user_file":
            (target / "notes.txt").write_text("my notes")
            foreign = ["notes.txt"]
        elif layout == "checkpoint_plus_tokenizer":
            save_checkpoint(tiny_cfg, tiny_vars, target)
            (target / "tokenizer.json").write_text("{}")
            foreign = ["tokenizer.json"]
        else:
            (target / "model-00001-of-00002.safetensors").mkdir()  # our name, but a directory
            foreign = ["model-00001-of-00002.safetensors/"]
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tiny_cfg, tiny_vars, target)
    message = str(info.value)
    assert str(target) in message and "choose a new or empty directory" in message
    assert all(name in message for name in foreign), message
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing left behind
    with pytest.raises(CheckpointError):
        check_save_target(target)


def test_save_refuses_a_file(tmp_path, tiny_cfg, tiny_vars):
    (tmp_path / "target").write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'target'}: it exists and is not a directory"):
        save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "target")
    assert (tmp_path / "target").read_text() == "not a directory"


def test_save_into_an_empty_directory_and_through_a_symlink(tmp_path, tiny_cfg, tiny_vars, make_variables):
    (tmp_path / "empty").mkdir()
    save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", SINGLE_FILE]
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    new = make_variables(tiny_cfg, seed=5)
    save_checkpoint(tiny_cfg, new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    got = load_checkpoint(tmp_path / "empty")[1]
    np.testing.assert_array_equal(got["params"]["embedding"], new["params"]["embedding"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link"]


def test_every_failing_save_keeps_the_users_files(tmp_path, make_config, tiny_cfg, tiny_vars):
    """A user's file beside the target and inside it survives each refused save, byte for byte."""
    (tmp_path / "mine.txt").write_text("precious")
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("also precious")
    extra = {**tiny_vars, "params": {**tiny_vars["params"], "extra": np.zeros(3, np.float32)}}
    as_int = {**tiny_vars, "params": {**tiny_vars["params"], "embedding": np.zeros((64, 32), np.int32)}}
    before = _snapshot(tmp_path)
    for cfg, variables in [
        (tiny_cfg, tiny_vars),  # foreign file in the target
        (make_config("tiny", hidden_size=48), tiny_vars),  # shapes do not match
        (tiny_cfg, extra),
        (tiny_cfg, as_int),
    ]:
        with pytest.raises(CheckpointError):
            save_checkpoint(cfg, variables, target)
        assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- item 10: saving
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path, tiny_cfg, tiny_vars, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "ckpt", max_shard_bytes=40_000)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o777 & ~umask
    files = list((tmp_path / "ckpt").iterdir())
    assert len(files) > 3
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def test_saving_int_or_extra_variables_is_refused(tmp_path, tiny_cfg, tiny_vars):
    as_int = {
        **tiny_vars,
        "params": {**tiny_vars["params"], "lm_head": tiny_vars["params"]["lm_head"].astype(np.int32)},
    }
    with pytest.raises(CheckpointError, match=r"variable params/lm_head has dtype int32; a checkpoint holds float32"):
        save_checkpoint(tiny_cfg, as_int, tmp_path / "ckpt")
    extra = {
        **tiny_vars,
        "params": {**tiny_vars["params"], "adapter": {"kernel": np.zeros((2, 2), np.float32)}},
        "batch_stats": {"mean": np.zeros(2, np.float32)},
    }
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tiny_cfg, extra, tmp_path / "ckpt")
    assert "unexpected variable params/adapter/kernel" in str(info.value)
    assert "unexpected variable batch_stats/mean" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_float64_and_float16_variables_round_trip(tmp_path, tiny_cfg, tiny_vars):
    variables = {**tiny_vars, "params": {**tiny_vars["params"]}}
    variables["params"]["lm_head"] = tiny_vars["params"]["lm_head"].astype(np.float64)
    variables["params"]["embedding"] = tiny_vars["params"]["embedding"].astype(np.float16)
    save_checkpoint(tiny_cfg, variables, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")[1]
    for name in ("lm_head", "embedding"):
        assert loaded["params"][name].dtype == variables["params"][name].dtype
        assert loaded["params"][name].tobytes() == variables["params"][name].tobytes()


# --------------------------------------------------------------------------- item 10: loading
EXPERT = "model.layers.1.mlp.experts.{}.gate_proj.weight"


def test_stacked_experts_with_mixed_dtypes_are_refused(tmp_path, saved):
    tensors = _tensors(saved)
    tensors[EXPERT.format(3)] = tensors[EXPERT.format(3)].astype(np.float16)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_copy_with(tmp_path, saved, tensors))
    message = str(info.value)
    assert "disagree in dtype" in message
    assert f"F16 ({EXPERT.format(3)})" in message and "F32 (" in message


def test_overlapping_data_offsets_are_refused(tmp_path, saved):
    data = (saved / SINGLE_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[EXPERT.format(1)]["data_offsets"] = header[EXPERT.format(0)]["data_offsets"]  # expert 1 reads expert 0
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out = _copy_with(tmp_path, saved)
    (out / SINGLE_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match=rf"{out / SINGLE_FILE}: not a valid safetensors file .*offset"):
        load_checkpoint(out)


def test_huge_header_length_is_a_clear_error(tmp_path, saved):
    out = _copy_with(tmp_path, saved)
    (out / SINGLE_FILE).write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match=rf"{out / SINGLE_FILE}: not a valid safetensors file .*header too large"):
        load_checkpoint(out)


@pytest.mark.parametrize("where", ["../outside.safetensors", "/abs/model.safetensors", "sub/model.safetensors", ".."])
def test_index_may_not_point_outside_the_checkpoint(tmp_path, tiny_cfg, tiny_vars, where):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_cfg, tiny_vars, ckpt, max_shard_bytes=40_000)
    index = json.loads((ckpt / INDEX_FILE).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    (tmp_path / "outside.safetensors").write_bytes((ckpt / shard).read_bytes())
    index["weight_map"][name] = where
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"maps {name} to '{where}'; shard files must be plain file names"):
        load_checkpoint(ckpt)


def test_broken_index_and_missing_shard_name_the_file(tmp_path, tiny_cfg, tiny_vars):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_cfg, tiny_vars, ckpt, max_shard_bytes=40_000)
    shard = sorted(p.name for p in ckpt.glob("model-*.safetensors"))[1]
    (ckpt / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"to {shard}, which does not exist in {ckpt}"):
        load_checkpoint(ckpt)
    (ckpt / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{ckpt / INDEX_FILE}: not a safetensors index"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("model_type", "llama", r"model_type='llama': only 'bailing_moe_v2'"),
        ("model_type", None, r"model_type=None: only 'bailing_moe_v2'"),
        ("hidden_size", 32.7, r"hidden_size=32.7: must be an integer"),
        ("num_experts", "8", r"num_experts='8': must be an integer"),
        ("torch_dtype", "int8", r"torch_dtype='int8': supported: float32, bfloat16, float16"),
        ("use_qk_norm", "false", r"use_qk_norm='false': must be true or false"),
        ("rope_theta", "1e4", r"rope_theta='1e4': must be a finite number"),
        ("vocab_size", None, r"missing field vocab_size"),
        ("rope_scaling", {"rope_type": "yarn"}, r"missing field rope_scaling.factor"),
    ],
)
def test_bad_config_fields_name_the_file_and_field(tmp_path, saved, tiny_cfg, key, value, match):
    hf = config_to_hf(tiny_cfg)
    hf[key] = value
    out = _copy_with(tmp_path, saved, config=json.dumps(hf))
    with pytest.raises(ConfigError, match=rf"{out / 'config.json'}: {match}"):
        load_checkpoint(out)


def test_unparsable_config_names_the_file(tmp_path, saved):
    out = _copy_with(tmp_path, saved, config='{"hidden_size": 32,')
    with pytest.raises(ConfigError, match=rf"{out / 'config.json'}: not valid JSON"):
        load_checkpoint(out)
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{out / 'config.json'}: must hold a JSON object"):
        load_checkpoint(out)
