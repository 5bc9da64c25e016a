"""model.attention_impl (ling_jax/ops/attention_impl.py): the selection per target, the fallbacks,
the splash kernel (Pallas interpret mode on CPU) against the XLA core in values and gradients, the
cuDNN fallback, config errors, and the splash path compiled ahead of time for TPU."""

from __future__ import annotations

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice.common import small_config

import ling_jax.ops.attention_impl as attention_impl
from ling_jax.config import ConfigError, ModelConfig
from ling_jax.ops.attention_core import AttentionMask, dot_product_attention
from ling_jax.ops.attention_impl import Query, attention, select_impl
from ling_jax.ops.pallas_target import Target
from ling_jax.train.config import experiment_from_config

CPU, TPU, GPU = Target("cpu"), Target("tpu", "TPU v5p"), Target("gpu", "NVIDIA H100 80GB HBM3")


def test_auto_picks_the_platform_core():
    assert select_impl("auto", Query(CPU, 256, 256)).impl == "xla"
    assert select_impl("auto", Query(TPU, 256, 256)).impl == "splash"
    assert select_impl("auto", Query(GPU, 256, 256)).impl == "cudnn"
    # Lengths the splash kernel cannot tile: auto quietly takes the XLA core on TPU.
    assert select_impl("auto", Query(TPU, 200, 200)) == ("xla", None)
    # A KV cache (decoding) always runs the XLA core.
    for target in (CPU, TPU, GPU):
        assert select_impl("auto", Query(target, 1, 512, cached=True)).impl == "xla"


def test_explicit_requests_fall_back_or_refuse():
    assert select_impl("xla", Query(TPU, 256, 256)).impl == "xla"
    assert select_impl("splash", Query(CPU, 256, 256)).impl == "splash"  # interpret mode
    choice = select_impl("splash", Query(TPU, 200, 200))
    assert choice.impl == "xla" and "multiple of 128" in choice.reason and "attention_impl" in choice.reason
    with pytest.raises(RuntimeError, match="attention_impl='cudnn' is unavailable: cuDNN runs on NVIDIA GPUs"):
        select_impl("cudnn", Query(CPU, 256, 256))
    with pytest.raises(RuntimeError, match="splash kernel is a TPU"):
        select_impl("splash", Query(GPU, 256, 256))
    with pytest.raises(ValueError, match="not one of"):
        select_impl("flash", Query(CPU, 256, 256))


def test_config_validates_attention_impl():
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ConfigError, match=r"model.attention_impl 'splash' cannot take train.seq_len=96"):
        experiment_from_config(
            small_config(model={"attention_impl": "splash", "max_position_embeddings": 128}, train={"seq_len": 96})
        )
    with pytest.raises(ConfigError, match=r"model.attention_impl .*mesh.context=2.*multiple of 128"):
        experiment_from_config(
            small_config(
                model={"attention_impl": "splash", "max_position_embeddings": 256},
                train={"seq_len": 128},
                mesh={"data": 1, "context": 2},
            )
        )
    exp = experiment_from_config(
        small_config(model={"attention_impl": "splash", "max_position_embeddings": 256}, train={"seq_len": 256})
    )
    assert exp.model.attention_impl == "splash"


def packed(B=2, T=256, H=2, K=1, d=128, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = (jax.random.normal(ks[0], (B, T, H, d)) * 2).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, d)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, d)).astype(dtype)
    dout = jax.random.normal(ks[3], (B, T, H, d)).astype(dtype)
    seg = np.ones((B, T), np.int32)
    seg[0, 100:] = 2  # two documents in row 0 (crossing a 128 block)
    seg[1, 200:] = 0  # trailing padding in row 1
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    mask = AttentionMask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(idx))
    return q, k, v, dout, mask


def _value_and_grads(f, q, k, v, dout):
    out, vjp = jax.vjp(f, q, k, v)
    return [np.asarray(out, np.float64)] + [np.asarray(g, np.float64) for g in vjp(dout)]


@pytest.fixture(scope="module")
def splash_vs_xla():
    q, k, v, dout, mask = packed()
    xla = _value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, mask.dense()), q, k, v, dout)
    splash = _value_and_grads(
        jax.jit(lambda q, k, v: attention(q, k, v, mask, impl="splash", cached=False)), q, k, v, dout
    )
    return xla, splash


def test_splash_interpret_equals_xla_values_and_gradients(splash_vs_xla):
    """GQA 2/1 with head_dim 128 (every Ling size), packed segments and padding: output and the
    q / k / v gradients of the splash kernel (interpret mode) equal the XLA core."""
    xla, splash = splash_vs_xla
    for name, a, b in zip(("out", "dq", "dk", "dv"), xla, splash):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * np.max(np.abs(a)), err_msg=name)


def test_cudnn_refusal_falls_back_to_xla_once(monkeypatch):
    """A GPU target whose cuDNN refuses the operands (here: no GPU to run on at all) runs the XLA
    core, with one RuntimeWarning naming the refusal, however often it is traced."""
    monkeypatch.setattr(attention_impl, "kernel_target", lambda: GPU)
    monkeypatch.setattr(attention_impl, "_warned", set())
    q, k, v, _, mask = packed(T=64, d=16)
    want = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask.dense(), query_chunks=2))(q, k, v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jax.jit(lambda q, k, v: attention(q, k, v, mask, impl="cudnn", cached=False))(q, k, v)
        jax.eval_shape(lambda q, k, v: attention(q, k, v, mask, impl="auto", cached=False), q, k, v)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    refusals = [w for w in caught if "cuDNN refused" in str(w.message)]
    assert len(refusals) == 1 and "running 'xla'" in str(refusals[0].message)


@pytest.mark.slow  # ~50 s (two TPU compiles of the Mosaic kernel, forward and backward)
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the `tpu` extra)")
def test_splash_and_context_parallel_splash_compile_for_tpu():
    """Splash forward + backward lowers through Mosaic for a v5p topology (no TPU needed), alone and
    inside the context-parallel shard_map (data=2, context=4), with the Mosaic calls in the program."""
    import flax.linen as nn
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ling_jax.plan.topology import libtpu_missing_reason, parse_topology, topology_devices
    from ling_jax.sharding import build_mesh
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES

    if libtpu_missing_reason():
        pytest.skip(libtpu_missing_reason())
    devices = topology_devices(parse_topology("v5p:2x2x2"))
    q, k, v, dout, mask = packed(B=8, T=1024, dtype=jnp.bfloat16)
    for sizes in ({"data": 8}, {"data": 2, "context": 4}):
        mesh = build_mesh(sizes, devices)
        row = NamedSharding(mesh, P(("data",), "context" if "context" in sizes else None))
        four = NamedSharding(mesh, P(("data",), "context" if "context" in sizes else None, None, None))

        def loss(q, k, v, seg, idx):
            m = AttentionMask(seg, seg, idx, idx)
            return jnp.sum(attention(q, k, v, m, impl="splash", cached=False).astype(jnp.float32))

        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=four) for a in (q, k, v)]
        args += [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=row) for a in (mask.q_segment_BT, mask.q_index_BT)]
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args)
            text = lowered.as_text()
            lowered.compile()
        assert text.count("tpu_custom_call") >= 2, sizes  # forward and backward kernels
