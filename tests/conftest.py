"""Shared test fixtures: the golden vectors of the official reference (../shared/fixtures/ling_ref),
tiny random Ling configs, and random variables built without compiling an `init`.

Everything expensive is session-scoped, so compiled functions and loaded checkpoints are shared
by every test file in one pytest run.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported anywhere

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice.common import SMALL_MODEL

from ling_jax.config import ModelConfig, RopeScaling

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_NAMES = ("tiny_mtp", "tiny_yarn")


def ling_ref_dir() -> Path:
    """The golden-vector folder: $LING_REF_DIR, else ../shared/fixtures/ling_ref beside the repo."""
    if os.environ.get("LING_REF_DIR"):
        return Path(os.environ["LING_REF_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ling_ref"


@pytest.fixture(scope="session")
def ling_ref():
    """`ling_ref(name)` -> Path of one golden-vector checkpoint folder; skips if it is absent."""

    def folder(name: str) -> Path:
        path = ling_ref_dir() / name
        if not (path / "config.json").is_file():
            if os.environ.get("CI"):  # CI always has ../shared beside the clone: absent means broken
                pytest.fail(f"golden vectors {name!r} not found at {path} (CI=true)")
            pytest.skip(
                f"golden vectors {name!r} not found at {path} "
                "(set LING_REF_DIR to the ling_ref folder of the official-reference fixtures)"
            )
        return path

    return folder


@dataclasses.dataclass(frozen=True)
class RefFixture:
    name: str
    path: Path
    config: ModelConfig
    variables: dict  # as loaded by ling_jax.hf.load_checkpoint (host numpy leaves)
    expected: dict  # expected.npz
    grads: dict  # grads_intended.npz


def _load_ref(ling_ref, name: str) -> RefFixture:
    from ling_jax.hf import load_checkpoint

    path = ling_ref(name)
    cfg, variables = load_checkpoint(path)
    with np.load(path / "expected.npz") as f:
        expected = {k: f[k] for k in f.files}
    with np.load(path / "grads_intended.npz") as f:
        grads = {k: f[k] for k in f.files}
    return RefFixture(name, path, cfg, variables, expected, grads)


@pytest.fixture(scope="session")
def tiny_mtp(ling_ref) -> RefFixture:
    return _load_ref(ling_ref, "tiny_mtp")


@pytest.fixture(scope="session")
def tiny_yarn(ling_ref) -> RefFixture:
    return _load_ref(ling_ref, "tiny_yarn")


@pytest.fixture(scope="session", params=FIXTURE_NAMES)
def ref_fixture(request, tiny_mtp, tiny_yarn) -> RefFixture:
    """Each golden-vector checkpoint in turn."""
    return {"tiny_mtp": tiny_mtp, "tiny_yarn": tiny_yarn}[request.param]


# --------------------------------------------------------------------------- tiny random models
def tiny_config(**changes) -> ModelConfig:
    """The whole architecture at toy size: 3 layers (1 dense + 2 MoE), 8 experts top-2 in 4 groups
    (keep 2), a shared expert, 1 MTP layer, GQA 4/2, head_dim 8 with partial rotary 0.5, QK-norm."""
    base = dict(
        SMALL_MODEL,
        vocab_size=64,
        num_layers=3,
        mtp_loss_weight=0.3,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        use_qk_norm=True,
        eos_token_id=62,
        pad_token_id=63,
        init_std=0.02,
    )
    base.update(changes)
    return ModelConfig(**base)


def variant_config(**changes) -> ModelConfig:
    """The options the golden vectors do not cover: qkv bias, output bias, tied embeddings, YaRN,
    full rotary, no QK-norm, MHA, two MTP layers, no shared expert."""
    base = dict(
        use_qkv_bias=True,
        use_bias=True,
        tie_word_embeddings=True,
        use_qk_norm=False,
        partial_rotary_factor=1.0,
        num_kv_heads=4,
        num_mtp_layers=2,
        num_shared_experts=0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16),
    )
    base.update(changes)
    return tiny_config(**base)


def abstract_variables(cfg: ModelConfig):
    ids = jnp.zeros((1, 1), jnp.int32)
    from ling_jax.model import LingModel

    return nn.unbox(jax.eval_shape(lambda: LingModel(cfg).init(jax.random.key(0), ids)))


def random_variables(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random, non-trivial variables as numpy arrays (no compiled `init`): matrices ~ N(0, 1/D),
    embeddings ~ N(0, 1), norm scales 1 + 0.2 N(0, 1), biases and expert biases 0.1 N(0, 1)."""
    rng = np.random.default_rng(seed)
    std = 1.0 / np.sqrt(cfg.hidden_size)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "expert_bias" in name or "bias" in str(path[-1]):
            value = 0.1 * rng.standard_normal(leaf.shape)
        elif "scale" in str(path[-1]):
            value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
        elif "embedding" in str(path[-1]):
            value = rng.standard_normal(leaf.shape)
        else:
            value = std * rng.standard_normal(leaf.shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_variables(cfg))


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_vars(tiny_cfg) -> dict:
    return random_variables(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def variant_cfg() -> ModelConfig:
    return variant_config()


@pytest.fixture(scope="session")
def variant_vars(variant_cfg) -> dict:
    return random_variables(variant_cfg, seed=1)


# --------------------------------------------------------------------------- cheap compilation
# Tests compile far more than they run: XLA:CPU's LLVM backend at -O0 compiles these graphs 2-3x
# faster. The HLO (every XLA graph pass) is unchanged; only machine-code optimisation is reduced, so
# results may differ from an optimised build in the last bits (e.g. no FMA contraction).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_fast(fun, *args, **static_kwargs):
    """`fun(*args, **static_kwargs)` jitted and compiled for these argument shapes; returns the
    compiled callable (call it with arguments of the same shapes and dtypes)."""
    import functools

    jitted = jax.jit(functools.partial(fun, **static_kwargs))
    return jitted.lower(*args).compile(compiler_options=FAST_COMPILE_OPTIONS)


@pytest.fixture(scope="session")
def fast_jit():
    """`fast_jit(fun, *example_args)` -> compiled callable (see `compile_fast`)."""
    return compile_fast


@pytest.fixture(scope="session")
def make_config():
    """`make_config(kind="tiny" | "variant", **changes)` -> ModelConfig."""
    return lambda kind="tiny", **changes: (tiny_config if kind == "tiny" else variant_config)(**changes)


@pytest.fixture(scope="session")
def make_variables():
    """`make_variables(cfg, seed=0)` -> random numpy variables (see `random_variables`)."""
    return random_variables


@pytest.fixture(scope="session")
def make_abstract_variables():
    """`make_abstract_variables(cfg)` -> the variables' ShapeDtypeStructs (nothing allocated)."""
    return abstract_variables


@pytest.fixture(scope="session")
def gen_cfg() -> ModelConfig:
    """For decoding tests (each `generate` signature compiles a prefill and a decode loop): one
    MoE layer, no MTP. Dense + MoE stacks under the cache are covered by the golden generations."""
    return tiny_config(num_layers=1, first_k_dense_replace=0, num_mtp_layers=0)


@pytest.fixture(scope="session")
def gen_vars(gen_cfg) -> dict:
    return random_variables(gen_cfg, seed=4)


# --------------------------------------------------------------------------- notebook wall times
# tests/test_notebooks.py records each notebook's wall time as a user property (carried from xdist
# workers to the controller with the report); the controller prints them at the end of the run.
_NOTEBOOK_TIMES: list = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        _NOTEBOOK_TIMES.extend(value for key, value in report.user_properties if key == "notebook_wall_s")


def pytest_terminal_summary(terminalreporter):
    if _NOTEBOOK_TIMES:
        terminalreporter.section("notebook wall times (LING_JAX_NOTEBOOK_FAST=1)")
        for name, seconds, cpus in sorted(_NOTEBOOK_TIMES):
            terminalreporter.write_line(f"{name}: {seconds:.1f} s ({cpus} CPUs)")
        total = sum(seconds for _, seconds, _ in _NOTEBOOK_TIMES)
        terminalreporter.write_line(f"total: {total:.1f} s for {len(_NOTEBOOK_TIMES)} notebooks")
