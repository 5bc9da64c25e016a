"""HF BailingMoeV2 checkpoints: bit-exact save/load (single file and sharded, float32 and bfloat16,
scanned and unrolled layouts), re-export of the golden fixtures, config.json round trips, clear
errors for broken checkpoints, atomic saves, and host memory while loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import ling_jax.hf.checkpoint as checkpoint_module
from ling_jax.config import ModelConfig, RopeScaling
from ling_jax.hf import CheckpointError, config_from_hf, config_to_hf, load_checkpoint, save_checkpoint
from ling_jax.hf.checkpoint import INDEX_FILE, SINGLE_FILE

REPO = Path(__file__).resolve().parents[1]


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    out = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                assert name not in out, f"{name} in two shards"
                out[name] = f.get_tensor(name)
    return out


def _assert_bit_exact(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype, f"{name}: {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "kind,changes",
    [
        ("tiny", {}),
        ("tiny", dict(param_dtype="bfloat16", dtype="bfloat16")),
        ("variant", {}),  # qkv / output biases, tied embeddings, YaRN, 2 MTP layers, no shared expert
        ("tiny", dict(scan_layers=False)),
        ("variant", dict(scan_layers=False, param_dtype="bfloat16", dtype="bfloat16")),
    ],
    ids=["f32", "bf16", "variant", "unrolled", "variant-unrolled-bf16"],
)
def test_save_then_load_is_bit_exact(tmp_path, make_config, make_variables, kind, changes):
    cfg = make_config(kind, **changes)
    variables = make_variables(cfg, seed=21)
    if cfg.param_dtype == "bfloat16":
        assert variables["params"]["embedding"].dtype == ml_dtypes.bfloat16
    save_checkpoint(cfg, variables, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", SINGLE_FILE]
    loaded_cfg, loaded = load_checkpoint(tmp_path / "ckpt", scan_layers=cfg.scan_layers)
    assert loaded_cfg == cfg
    _assert_bit_exact(loaded, variables)
    assert _leftovers(tmp_path, "ckpt") == []


def test_scanned_and_unrolled_loads_hold_the_same_tensors(tmp_path, tiny_cfg, tiny_vars):
    save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "ckpt")
    cfg_u, unrolled = load_checkpoint(tmp_path / "ckpt", scan_layers=False)
    assert not cfg_u.scan_layers
    for collection in ("params", "expert_bias"):
        for stack, n in (("dense_stack", tiny_cfg.num_dense_layers), ("moe_stack", tiny_cfg.num_moe_layers)):
            if stack not in tiny_vars[collection]:
                continue
            layers = [unrolled[collection][stack][f"layers_{i}"] for i in range(n)]
            restacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
            _assert_bit_exact(restacked, tiny_vars[collection][stack]["layers"])


def test_sharded_save_loads_bit_exactly(tmp_path, make_config, make_variables):
    cfg = make_config("tiny")
    variables = make_variables(cfg, seed=22)
    limit = 40_000  # bytes: several shards, and tensors bigger than one shard get their own
    save_checkpoint(cfg, variables, tmp_path / "ckpt", max_shard_bytes=limit)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert INDEX_FILE in files and SINGLE_FILE not in files and len(shards) >= 3
    assert all(f == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, f in enumerate(shards))
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    tensors = _read_tensors(tmp_path / "ckpt")
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for shard in shards:
        with safe_open(tmp_path / "ckpt" / shard, framework="numpy") as f:
            names = list(f.keys())
            size = sum(f.get_tensor(n).nbytes for n in names)
        assert all(index["weight_map"][n] == shard for n in names)
        assert size <= limit or len(names) == 1, (shard, size)
    loaded_cfg, loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded_cfg == cfg
    _assert_bit_exact(loaded, variables)


def test_fixture_load_then_save_reproduces_every_tensor(tmp_path, ref_fixture):
    fx = ref_fixture
    original = _read_tensors(fx.path)
    assert any(name.endswith("mlp.gate.expert_bias") for name in original)
    save_checkpoint(fx.config, fx.variables, tmp_path / "out")
    saved = _read_tensors(tmp_path / "out")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and saved[name].shape == tensor.shape, name
        assert saved[name].tobytes() == tensor.tobytes(), name
    assert load_checkpoint(tmp_path / "out")[0] == fx.config
    # The unrolled layout exports the same file too.
    cfg_u, v_u = load_checkpoint(fx.path, scan_layers=False)
    save_checkpoint(cfg_u, v_u, tmp_path / "out_unrolled")
    resaved = _read_tensors(tmp_path / "out_unrolled")
    assert all(resaved[n].tobytes() == t.tobytes() for n, t in original.items()) and len(resaved) == len(original)


# --------------------------------------------------------------------------- config.json
def test_config_round_trip(make_config):
    configs = [
        make_config("tiny"),
        make_config("variant"),
        make_config(
            "tiny",
            rope_scaling=RopeScaling(
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=16.0,
                beta_slow=2.0,
                mscale=1.0,
                mscale_all_dim=0.5,
                truncate=False,
            ),
        ),
        make_config(
            "tiny",
            rope_scaling=RopeScaling(factor=2.0, original_max_position_embeddings=32, attention_factor=1.25),
            eos_token_id=None,
            pad_token_id=None,
        ),
        make_config("tiny", param_dtype="bfloat16", dtype="bfloat16", first_k_dense_replace=0, init_std=0.02),
        ModelConfig(),
    ]
    for cfg in configs:
        hf = config_to_hf(cfg)
        assert json.loads(json.dumps(hf)) == hf  # plain JSON
        assert config_from_hf(hf) == cfg


def test_config_round_trip_keeps_only_checkpoint_fields(make_config):
    """Run-time fields (activation dtype, layout, remat, dispatch) are not part of config.json."""
    cfg = make_config("tiny", dtype="bfloat16", scan_layers=False, remat_policy="full", moe_dispatch="ragged")
    back = config_from_hf(config_to_hf(cfg))
    assert back == cfg.replace(dtype="float32", scan_layers=True, remat_policy="none", moe_dispatch="auto")


def test_fixture_configs(ref_fixture):
    raw = json.loads((ref_fixture.path / "config.json").read_text())
    cfg = config_from_hf(raw)
    assert cfg == ref_fixture.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads) == (3, 64, 16, 4, 2)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (16, 4, 4, 2)
    assert cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 8
    assert cfg.rope_theta == 600000.0 and cfg.routed_scaling_factor == 2.5 and cfg.use_qk_norm
    assert cfg.mtp_loss_weight == 0.3 and cfg.eos_token_id == cfg.pad_token_id == 511
    if ref_fixture.name == "tiny_yarn":
        assert cfg.num_mtp_layers == 0
        assert cfg.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=64)
    else:
        assert cfg.num_mtp_layers == 1 and cfg.rope_scaling is None
    ours = config_to_hf(cfg)
    for key, value in ours.items():  # every field we write agrees with the reference's file
        if key in raw and key != "torch_dtype":
            assert raw[key] == value, key
    assert config_from_hf(ours) == cfg


def test_config_from_hf_rejects_unsupported_settings():
    from ling_jax.config import ConfigError

    base = config_to_hf(ModelConfig())
    for key, value, match in [
        ("hidden_act", "gelu", "hidden_act"),
        ("score_function", "softmax", "score_function"),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling type 'linear'"),
        ("num_experts", None, "num_experts"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_hf(dict(base, **{key: value}))


# --------------------------------------------------------------------------- broken checkpoints
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, tiny_cfg, tiny_vars):
    path = tmp_path_factory.mktemp("good") / "ckpt"
    save_checkpoint(tiny_cfg, tiny_vars, path)
    return path, _read_tensors(path)


def _write_broken(tmp_path: Path, good, edit) -> Path:
    path, tensors = good
    tensors = dict(tensors)
    edit(tensors)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, broken / SINGLE_FILE)
    return broken


QKV = "model.layers.1.attention.query_key_value.weight"


def test_missing_tensor(tmp_path, good_checkpoint):
    broken = _write_broken(tmp_path, good_checkpoint, lambda t: t.pop(QKV))
    with pytest.raises(CheckpointError, match=rf"missing tensor {QKV} \(expected shape \[64, 32\]\)"):
        load_checkpoint(broken)


def test_unexpected_tensor(tmp_path, good_checkpoint):
    extra = "model.layers.9.mlp.gate.weight"
    broken = _write_broken(tmp_path, good_checkpoint, lambda t: t.update({extra: np.zeros((8, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor {extra} \(shape \[8, 32\]\)"):
        load_checkpoint(broken)


def test_misshaped_tensor(tmp_path, good_checkpoint):
    broken = _write_broken(tmp_path, good_checkpoint, lambda t: t.update({QKV: np.zeros((64, 31), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"tensor {QKV} has shape \[64, 31\], config expects \[64, 32\]"):
        load_checkpoint(broken)


def test_every_problem_is_listed(tmp_path, good_checkpoint):
    def edit(t):
        t.pop(QKV)
        t.pop("model.norm.weight")
        t["lm_head.weight"] = np.zeros((3, 3), np.float32)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_write_broken(tmp_path, good_checkpoint, edit))
    message = str(info.value)
    assert QKV in message and "model.norm.weight" in message and "lm_head.weight has shape [3, 3]" in message
    assert str(tmp_path / "broken") in message


def test_ignores_rotary_inv_freq_buffer(tmp_path, good_checkpoint, tiny_vars):
    broken = _write_broken(
        tmp_path, good_checkpoint, lambda t: t.update({"model.rotary_emb.inv_freq": np.ones((2,), np.float32)})
    )
    _assert_bit_exact(load_checkpoint(broken)[1], tiny_vars)


def test_missing_files_name_the_directory(tmp_path, good_checkpoint):
    path, _ = good_checkpoint
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / SINGLE_FILE).write_bytes((path / SINGLE_FILE).read_bytes())
    with pytest.raises(FileNotFoundError, match=f"no config.json in checkpoint directory {no_config}"):
        load_checkpoint(no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=rf"{no_weights}: neither {INDEX_FILE} nor {SINGLE_FILE} found"):
        load_checkpoint(no_weights)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_checkpoint(tmp_path / "nowhere")


def test_saving_variables_that_do_not_match_the_config(tmp_path, make_config, tiny_vars):
    other = make_config("tiny", hidden_size=48)
    with pytest.raises(
        CheckpointError, match=r"variable params/embedding has shape \[64, 32\], config expects \[64, 48\]"
    ):
        save_checkpoint(other, tiny_vars, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"missing variable params/lm_head"):
        save_checkpoint(
            make_config("tiny"),
            {
                "params": {k: v for k, v in tiny_vars["params"].items() if k != "lm_head"},
                "expert_bias": tiny_vars["expert_bias"],
            },
            tmp_path / "ckpt",
        )
    assert not (tmp_path / "ckpt").exists() and _leftovers(tmp_path, "ckpt") == []


# --------------------------------------------------------------------------- atomic saves
def _failing_save_file(monkeypatch, fail_on_call: int):
    calls = {"n": 0}
    real = checkpoint_module.save_file

    def flaky(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            Path(filename).write_bytes(b"partial")  # as a crash midway through a file would leave
            raise OSError("disk full (simulated)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", flaky)
    return calls


def test_failed_save_leaves_nothing_at_the_target(tmp_path, monkeypatch, tiny_cfg, tiny_vars):
    calls = _failing_save_file(monkeypatch, fail_on_call=2)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "ckpt", max_shard_bytes=40_000)
    assert calls["n"] == 2
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, tiny_cfg, tiny_vars, make_variables):
    save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    _failing_save_file(monkeypatch, fail_on_call=1)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tiny_cfg, make_variables(tiny_cfg, seed=99), tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _assert_bit_exact(load_checkpoint(tmp_path / "ckpt")[1], tiny_vars)


def test_save_over_an_existing_checkpoint_replaces_it(tmp_path, tiny_cfg, tiny_vars, make_variables):
    save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "ckpt", max_shard_bytes=40_000)  # sharded
    new = make_variables(tiny_cfg, seed=98)
    save_checkpoint(tiny_cfg, new, tmp_path / "ckpt")  # single file: no stale shards may survive
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", SINGLE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _assert_bit_exact(load_checkpoint(tmp_path / "ckpt")[1], new)


# --------------------------------------------------------------------------- host memory
# Peak RSS of this process. ru_maxrss alone is not enough here: Linux carries the parent's peak
# across fork + exec into the child's ru_maxrss (the pytest process is far bigger than the
# checkpoint), so read the current address space's high-water mark VmHWM where /proc exists.
_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import jax, numpy as np
    from ling_jax.hf import load_checkpoint

    def peak_rss():
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    jax.numpy.zeros(1).block_until_ready()
    base = peak_rss()
    cfg, variables = load_checkpoint(sys.argv[1])
    peak = peak_rss()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(variables))
    print(json.dumps({"base": base, "peak": peak, "nbytes": nbytes}))
    """
)


def _random_bf16_variables(cfg, make_variables_abstract, seed=0):
    """Random finite bfloat16 bit patterns (fast: no float64 temporaries)."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if leaf.dtype == ml_dtypes.bfloat16:
            bits = rng.integers(0, 1 << 16, size=leaf.shape, dtype=np.uint16) & np.uint16(0xBFFF)  # finite
            return bits.view(ml_dtypes.bfloat16)
        return rng.standard_normal(leaf.shape).astype(leaf.dtype)

    return jax.tree.map(fill, make_variables_abstract(cfg))


def test_loading_peak_host_memory_is_about_the_checkpoint_size(tmp_path, make_config, make_abstract_variables):
    cfg = make_config(
        "tiny",
        vocab_size=16384,
        hidden_size=1024,
        num_heads=8,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=2048,
        num_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=512,
        num_layers=3,
        num_mtp_layers=0,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    variables = _random_bf16_variables(cfg, make_abstract_variables)
    save_checkpoint(cfg, variables, tmp_path / "big")
    size = os.path.getsize(tmp_path / "big" / SINGLE_FILE)
    assert 250e6 < size < 350e6
    del variables
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "big")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["nbytes"] > 0.99 * size
    increase = m["peak"] - m["base"]
    assert increase <= 1.2 * size + 32 * 2**20, (
        f"loading a {size / 2**20:.0f} MiB checkpoint raised peak RSS by {increase / 2**20:.0f} MiB"
    )


def test_corrupt_files_give_checkpoint_errors(tmp_path, good_checkpoint):
    path, _ = good_checkpoint
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((path / "config.json").read_text())
    data = (path / SINGLE_FILE).read_bytes()
    (truncated / SINGLE_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"not a valid safetensors file \(.*not fully covered"):
        load_checkpoint(truncated)
    (truncated / SINGLE_FILE).write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match=rf"{truncated / SINGLE_FILE}: not a valid safetensors file"):
        load_checkpoint(truncated)


def test_index_pointing_at_the_wrong_shard(tmp_path, tiny_cfg, tiny_vars):
    save_checkpoint(tiny_cfg, tiny_vars, tmp_path / "ckpt", max_shard_bytes=40_000)
    index_file = tmp_path / "ckpt" / INDEX_FILE
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"maps {name} to {shards[1]}, which does not hold it"):
        load_checkpoint(tmp_path / "ckpt")
