"""The one routed-expert selector (ling_jax/ops/dispatch.py `select_impl`): its documented order, its
fallbacks, and the planner's choice (ling_jax/plan/compiled.py `resolve_dispatch`) equal to what the
MoE layer runs, for every target platform x dtype x FP8 mode x CPU-kernel build."""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config
from jax._src.mesh import AbstractDevice
from jax.sharding import AbstractMesh

import cpu_kernels.moe_experts as kernel_module
from ling_jax.config import ModelConfig
from ling_jax.layers.moe import MoE
from ling_jax.ops import dispatch as dispatch_module
from ling_jax.ops.dispatch import IMPLS, Query, Selection, select_impl
from ling_jax.ops.pallas_target import Target, kernel_target
from ling_jax.plan.compiled import resolve_dispatch
from ling_jax.sharding.mesh import MESH_AXES
from ling_jax.train.config import base_config, experiment_from_config

TARGETS = {
    "cpu": Target("cpu", "cpu"),
    "gpu_hopper": Target("gpu", "NVIDIA H100 80GB HBM3"),
    "gpu_other": Target("gpu", "NVIDIA A100-SXM4-80GB"),
    "tpu": Target("tpu", "TPU v5p"),
}
DTYPES = ("float32", "bfloat16")
FP8_MODES = ("off", "xla", "pallas")
REQUESTS = ("auto", "dense", "ragged", "blocked", "cpu_kernel")


def small_model(**overrides) -> ModelConfig:
    # The routed experts only: the shared MLP's FP8 kernels are not under test.
    return tiny_config(num_shared_experts=0, num_mtp_layers=0, **overrides)


def test_auto_order_is_the_documented_one():
    def auto(target, dtype=jnp.float32, fp8=None, built=True):
        return select_impl("auto", Query(TARGETS[target], dtype, fp8, built))

    assert auto("cpu") == Selection("cpu_kernel")
    assert auto("cpu", built=False) == Selection("blocked")
    assert auto("cpu", dtype=jnp.bfloat16) == Selection("blocked")
    assert auto("tpu") == auto("tpu", dtype=jnp.bfloat16) == Selection("ragged")
    assert auto("gpu_hopper") == Selection("ragged")
    assert auto("gpu_other") == Selection("dense")
    for target, fp8 in itertools.product(TARGETS, ("xla", "pallas")):  # only "blocked" has FP8 expert GEMMs
        assert auto(target, fp8=fp8) == Selection("blocked")


def test_explicit_requests_fall_back_for_operands_and_raise_for_the_machine():
    bf16_cpu = Query(TARGETS["cpu"], jnp.bfloat16, None, True)
    choice = select_impl("cpu_kernel", bf16_cpu)
    assert choice.impl == "blocked" and "float32 only" in choice.reason and "bfloat16" in choice.reason
    choice = select_impl("ragged", Query(TARGETS["tpu"], jnp.bfloat16, "xla", True))
    assert choice.impl == "blocked" and "no FP8 path" in choice.reason
    assert select_impl("dense", Query(TARGETS["tpu"], jnp.float32, None, True)) == Selection("dense")
    with pytest.raises(RuntimeError, match="runs on CPU only, the program targets tpu"):
        select_impl("cpu_kernel", Query(TARGETS["tpu"], jnp.float32, None, True))
    with pytest.raises(RuntimeError, match="moe_dispatch 'cpu_kernel' is unavailable"):
        select_impl("cpu_kernel", Query(TARGETS["cpu"], jnp.float32, None, False))
    with pytest.raises(ValueError, match="moe_dispatch 'megablox' is not one of"):
        select_impl("megablox", bf16_cpu)
    with pytest.raises(ValueError, match="ops spell FP8 off as None"):
        Query(TARGETS["cpu"], jnp.float32, "off", True)


def test_bf16_cpu_kernel_request_warns_once_with_the_reason(monkeypatch):
    monkeypatch.setattr(dispatch_module, "_warned", set())
    x = jnp.ones((6, 8), jnp.bfloat16)
    experts = dispatch_module.ExpertWeights(
        jnp.ones((4, 8, 4), jnp.bfloat16), jnp.ones((4, 8, 4), jnp.bfloat16), jnp.ones((4, 4, 8), jnp.bfloat16)
    )
    ids, w = jnp.zeros((6, 2), jnp.int32), jnp.ones((6, 2))
    with pytest.warns(RuntimeWarning, match="'cpu_kernel' cannot run here: the CPU kernel computes in float32 only"):
        run = lambda: dispatch_module.dispatch(x, ids, w, experts, impl="cpu_kernel")  # noqa: E731
        assert jax.eval_shape(run).dtype == jnp.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.eval_shape(run)  # once only


def test_hopper_is_judged_from_the_device_kind():
    assert [TARGETS[t].is_hopper for t in TARGETS] == [False, True, False, False]
    assert Target("cuda", "NVIDIA H200").is_hopper and Target("gpu", "NVIDIA GH200 480GB").is_hopper
    with pytest.raises(ValueError, match="unknown platform 'abacus'"):
        Target("abacus")


def test_target_follows_the_traced_mesh_not_the_default_backend():
    assert kernel_target().platform == jax.default_backend() == "cpu"
    mesh = AbstractMesh((1,) * len(MESH_AXES), MESH_AXES, abstract_device=AbstractDevice("TPU v5p", None, "tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        assert kernel_target() == TARGETS["tpu"]


@pytest.fixture(scope="module")
def base_experiment():
    config = base_config()
    config.train.seq_len = 64  # within tiny_config's max_position_embeddings
    return experiment_from_config(config)


def _runtime_choice(cfg: ModelConfig, target: Target, monkeypatch) -> str:
    """The implementation the MoE layer runs when traced for `target` (every implementation replaced by
    a recorder, so nothing target-specific is lowered)."""
    ran = []

    def recorder(name):
        def fn(x_ND, ids_Nk, weights_Nk, experts, **kwargs):
            ran.append((name, kwargs.get("fp8_impl")))
            return jnp.zeros_like(x_ND)

        return fn

    for name, impl in IMPLS.items():
        monkeypatch.setitem(IMPLS, name, dataclasses.replace(impl, fn=recorder(name)))
    mesh = AbstractMesh(
        (1,) * len(MESH_AXES), MESH_AXES, abstract_device=AbstractDevice(target.device_kind, None, target.platform)
    )
    x_BTD, mask_BT = jnp.ones((2, 4, cfg.hidden_size), cfg.jnp_dtype), jnp.ones((2, 4), bool)
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback warnings are tested above
        jax.eval_shape(lambda: nn.unbox(MoE(cfg).init(jax.random.key(0), x_BTD, mask_BT)))
    assert len({r for r in ran}) == 1, ran
    name, fp8 = ran[0]
    assert fp8 == (None if cfg.fp8 == "off" else cfg.fp8) or name != "blocked"
    return name


@pytest.mark.parametrize("built", [True, False], ids=["kernel_built", "kernel_missing"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_planner_choice_equals_runtime_choice(target, built, base_experiment, monkeypatch):
    reason = None if built else "the extension was not built (test)"
    monkeypatch.setattr(kernel_module, "unavailable_reason", lambda: reason)
    for dtype, fp8, requested in itertools.product(DTYPES, FP8_MODES, REQUESTS):
        cfg = small_model(dtype=dtype, fp8=fp8, moe_dispatch=requested)
        exp = dataclasses.replace(base_experiment, model=cfg)
        case = (target, dtype, fp8, requested, built)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                planned = resolve_dispatch(exp, TARGETS[target]).model.moe_dispatch
        except RuntimeError as e:  # a request this target cannot provide: the run must refuse it too
            with pytest.raises(RuntimeError, match="unavailable"):
                _runtime_choice(cfg, TARGETS[target], monkeypatch)
            assert requested == "cpu_kernel" and (target != "cpu" or not built), (case, e)
            continue
        assert _runtime_choice(cfg, TARGETS[target], monkeypatch) == planned, case
        if fp8 != "off":
            assert planned == "blocked", case  # FP8 expert GEMMs, planned as run
