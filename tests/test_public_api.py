"""The public API: `import ling_jax` alone is enough to configure, build, run, save and count a
model; the import itself stays light; `init` output (logically partitioned boxes) works wherever
variables are taken; each layer initialises and differentiates on its own; every preset loads by
name (also as `ling-jax --config NAME`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, compile_fast, tiny_config

import ling_jax

PUBLIC_NAMES = {
    "__version__",
    "ConfigError",
    "LingModel",
    "LingOutput",
    "ModelConfig",
    "ParamCounts",
    "apply_checked",
    "configs",
    "count_params",
    "generate",
    "init_variables",
    "load_checkpoint",
    "save_checkpoint",
    "unbox",
}
PUBLISHED_PRESETS = {"tiny", "ling_mini_2", "ling_flash_2", "ling_1t"}


def test_public_names():
    assert set(ling_jax.__all__) == PUBLIC_NAMES
    assert set(ling_jax.__all__) == {"__version__", *ling_jax._EXPORTS}
    assert set(dir(ling_jax)) >= PUBLIC_NAMES
    from ling_jax.config import ModelConfig
    from ling_jax.decoding import generate
    from ling_jax.hf import load_checkpoint, save_checkpoint
    from ling_jax.model import LingModel
    from ling_jax.params import count_params

    assert ling_jax.ModelConfig is ModelConfig and ling_jax.LingModel is LingModel
    assert ling_jax.generate is generate and ling_jax.count_params is count_params
    assert ling_jax.load_checkpoint is load_checkpoint and ling_jax.save_checkpoint is save_checkpoint
    assert ling_jax.configs.get("tiny").model.hidden_size == 128
    assert isinstance(ling_jax.__version__, str) and ling_jax.__version__[0].isdigit()
    with pytest.raises(AttributeError, match="no attribute 'LingModle'"):
        ling_jax.LingModle  # noqa: B018


def test_import_is_light():
    """`import ling_jax` loads neither the model nor the training, checkpoint or data stacks."""
    code = (
        "import sys, ling_jax\n"
        "heavy = ('ling_jax.model', 'ling_jax.train', 'ling_jax.hf', 'ling_jax.data', 'ling_jax.decoding',\n"
        "         'orbax', 'grain', 'optax', 'tensorboardX', 'matplotlib', 'safetensors', 'tokenizers')\n"
        "print([m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def boxed():
    """A small model initialised through the top-level names only, as `init` returns it (boxed)."""
    cfg = ling_jax.ModelConfig(**tiny_config().to_mapping())
    ids_BT = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 6)), jnp.int32)
    return cfg, jax.jit(ling_jax.LingModel(cfg).init)(jax.random.key(0), ids_BT), ids_BT


def test_model_from_the_top_level(boxed):
    cfg, variables, ids_BT = boxed
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)  # what init returns: boxed
    out = jax.jit(ling_jax.LingModel(cfg).apply)(variables, ids_BT)
    assert isinstance(out, ling_jax.LingOutput)
    assert out.logits.shape == (*ids_BT.shape, cfg.vocab_size)
    assert out.mtp_logits.shape == (cfg.num_mtp_layers, *ids_BT.shape, cfg.vocab_size)
    # generate takes the boxed tree too; greedy decoding's first token is the forward's argmax
    tokens = ling_jax.generate(cfg, variables, [ids_BT[0].tolist()], max_new_tokens=2).tokens
    assert tokens.shape == (1, 2) and tokens[0, 0] == int(jnp.argmax(out.logits[0, -1]))
    plain = ling_jax.unbox(variables)
    counts = ling_jax.count_params(cfg)
    main_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(plain["params"]) if "mtp_" not in str(path[0])]
    assert isinstance(counts, ling_jax.ParamCounts)
    assert counts.total == sum(x.size for x in main_leaves) and counts.activated < counts.total


def test_boxed_variables_save(boxed, tmp_path):
    """`save_checkpoint(cfg, LingModel(cfg).init(...), dir)` used to fail on the boxes."""
    cfg, variables, _ = boxed
    ling_jax.save_checkpoint(cfg, variables, tmp_path / "ckpt")
    cfg2, loaded = ling_jax.load_checkpoint(tmp_path / "ckpt")
    assert cfg2 == cfg
    plain = ling_jax.unbox(variables)
    assert jax.tree.structure(loaded) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- components for jax.grad
@pytest.fixture(scope="module")
def component_setup():
    from ling_jax.layers.inputs import layer_inputs

    cfg = tiny_config()
    x_BTD = jax.random.normal(jax.random.key(1), (2, 8, cfg.hidden_size))
    return cfg, x_BTD, layer_inputs(cfg, 2, 8)


def _grads(module, args, output=lambda out: out):
    """Plain params of `module` and d(mean square of its output)/d(params)."""
    key = jax.random.key(0)
    variables = ling_jax.unbox(compile_fast(module.init, key, *args)(key, *args))
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(p):
        return jnp.mean(jnp.square(output(module.apply({"params": p, **rest}, *args))))

    grads = compile_fast(jax.grad(loss), params)(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    return variables, grads


def _nonzero(tree) -> bool:
    return all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(tree))


def test_grad_attention_and_mlp(component_setup):
    from ling_jax.layers.attention import Attention
    from ling_jax.layers.mlp import MLP

    cfg, x_BTD, inputs = component_setup
    _, grads = _grads(Attention(cfg), (x_BTD, inputs.cos_BTR, inputs.sin_BTR, inputs.mask_BTS), lambda o: o[0])
    assert set(grads) >= {"q_proj", "k_proj", "v_proj", "o_proj"} and _nonzero(grads)
    _, grads = _grads(MLP(cfg, cfg.intermediate_size), (x_BTD,))
    assert set(grads) == {"gate_proj", "up_proj", "down_proj"} and _nonzero(grads)


def test_grad_moe_router_and_experts(component_setup):
    """Without a token mask every token is real; the router gets a gradient, and an expert's
    weights get one exactly when tokens were routed to it."""
    from ling_jax.layers.moe import EXPERT_BIAS, MoE

    cfg, _, _ = component_setup
    x_BTD = jax.random.normal(jax.random.key(3), (1, 3, cfg.hidden_size))  # 6 assignments, 8 experts
    moe = MoE(cfg)
    variables, grads = _grads(moe, (x_BTD,), lambda o: o[0])
    assert EXPERT_BIAS in variables and EXPERT_BIAS not in grads
    assert bool(jnp.any(grads["router"] != 0))
    _, stats = moe.apply(variables, x_BTD)
    assert float(stats.counts_E.sum()) == x_BTD.shape[1] * cfg.num_experts_per_tok  # all tokens real
    _, masked = moe.apply(variables, x_BTD, jnp.zeros(x_BTD.shape[:2], bool).at[0, 0].set(True))
    assert float(masked.counts_E.sum()) == cfg.num_experts_per_tok
    used_E = np.asarray(stats.counts_E) > 0
    assert 0 < used_E.sum() < cfg.num_experts  # some experts unused: the zero case is tested too
    for name in ("gate_proj", "up_proj", "down_proj"):
        has_grad_E = np.asarray(jnp.any(grads[name] != 0, axis=(1, 2)))
        np.testing.assert_array_equal(has_grad_E, used_E, err_msg=name)


def test_grad_decoder_and_mtp_layers(component_setup):
    from ling_jax.layers.decoder import DecoderLayer, MTPLayer

    cfg, x_BTD, inputs = component_setup
    common = (inputs.cos_BTR, inputs.sin_BTR, inputs.mask_BTS)
    for is_moe in (False, True):
        _, grads = _grads(DecoderLayer(cfg, is_moe=is_moe), (x_BTD, *common), lambda o: o[0])
        assert ("moe" in grads) == is_moe and _nonzero(grads["attention"])
    emb_BTD = jax.random.normal(jax.random.key(2), x_BTD.shape)
    _, grads = _grads(MTPLayer(cfg), (emb_BTD, x_BTD, *common, inputs.token_mask_BT), lambda o: o[0])
    assert bool(jnp.any(grads["eh_proj"]["kernel"] != 0)) and bool(jnp.any(grads["layer"]["moe"]["router"] != 0))


# --------------------------------------------------------------------------- presets
def test_every_preset_by_name():
    from ling_jax.train.config import experiment_from_config

    names = set(ling_jax.configs.names())
    assert names >= PUBLISHED_PRESETS
    for name in sorted(names):
        config = ling_jax.configs.get(name)
        model = ling_jax.configs.model_config(name)
        assert isinstance(model, ling_jax.ModelConfig) and model.hidden_size == config.model.hidden_size
        if name in PUBLISHED_PRESETS:  # pre-training configs: the whole experiment validates
            assert experiment_from_config(config).model == model
        assert ling_jax.configs.path(name).is_file()
        config.train.steps = -1  # a fresh ConfigDict each call
        assert ling_jax.configs.get(name).train.steps > 0
    with pytest.raises(ValueError, match="unknown config preset 'tinyy'; the presets are .*tiny"):
        ling_jax.configs.get("tinyy")


def test_cli_takes_a_preset_name(tmp_path):
    from ling_jax.commands.flags import expand_presets

    tiny = str(ling_jax.configs.path("tiny"))
    assert expand_presets(["ling-jax", "train", "--config", "tiny", "--config.train.steps=5"]) == [
        "ling-jax",
        "train",
        "--config",
        tiny,
        "--config.train.steps=5",
    ]
    assert expand_presets(["x", "params", "--config=ling_1t"])[2] == f"--config={ling_jax.configs.path('ling_1t')}"
    assert expand_presets(["x", "params", "--config", "configs/tiny.py"])[3] == "configs/tiny.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = {}
    for value in ("tiny", str(REPO_ROOT / "configs" / "tiny.py")):
        out = subprocess.run(
            [sys.executable, "-m", "ling_jax.cli", "params", "--config", value, "--config.model.num_layers=3"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        runs[value] = json.loads(out.stdout.strip().splitlines()[-1])
    assert len({json.dumps(r, sort_keys=True) for r in runs.values()}) == 1
    assert runs["tiny"]["total"] < ling_jax.count_params(ling_jax.configs.model_config("tiny")).total
