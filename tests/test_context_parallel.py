"""Context parallelism (ling_jax/ops/context_parallel.py): the zigzag layout, the attention op on 8
emulated devices against the one-device core (values and gradients), training on (data=2,
context=4) against one device with packed rows and MTP on, and the config errors."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest
from multidevice.common import PYTHON, REPO_ROOT, small_config, subprocess_env

from ling_jax.config import ConfigError
from ling_jax.ops.context_parallel import zigzag_slots
from ling_jax.train.config import experiment_from_config


def test_zigzag_rows_balance_causal_work():
    T, C = 64, 4
    slots = zigzag_slots(T, C)
    assert sorted(slots.tolist()) == list(range(T))
    chunk = T // (2 * C)
    per_device = slots.reshape(C, 2 * chunk)
    for i in range(C):  # device i: chunk i then chunk 2C-1-i
        assert per_device[i, :chunk].tolist() == list(range(i * chunk, (i + 1) * chunk))
        late = 2 * C - 1 - i
        assert per_device[i, chunk:].tolist() == list(range(late * chunk, (late + 1) * chunk))
    # Causal work (keys visible to each row) is the same on every device.
    work = (per_device + 1).sum(axis=1)
    assert np.all(work == work[0])


def test_context_axis_must_split_the_sequence():
    with pytest.raises(ConfigError, match=r"mesh.context .*train.seq_len \(36\).*multiple of 8"):
        experiment_from_config(small_config(train={"seq_len": 36}, mesh={"data": 2, "context": 4}))
    with pytest.raises(ConfigError, match="mesh.context must be a positive size"):
        experiment_from_config(small_config(mesh={"data": 1, "context": -1}))
    exp = experiment_from_config(small_config(mesh={"data": 2, "context": 4}))
    assert exp.mesh.axes["context"] == 4


_OP_SCRIPT = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from ling_jax.ops.attention_core import AttentionMask, dot_product_attention
    from ling_jax.ops.attention_impl import attention
    from ling_jax.sharding import build_mesh
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES

    B, T, H, K, d = 4, 64, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, d)) * 2
    k = jax.random.normal(ks[1], (B, T, K, d))
    v = jax.random.normal(ks[2], (B, T, K, d))
    dout = jax.random.normal(ks[3], (B, T, H, d))
    seg = np.ones((B, T), np.int32); seg[0, 20:] = 2; seg[1, 50:] = 0; seg[2, 5:40] = 3
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    mask = AttentionMask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(idx))

    def run(f):
        out, vjp = jax.vjp(f, q, k, v)
        return [np.asarray(out)] + [np.asarray(g) for g in vjp(dout)]

    ref = run(lambda q, k, v: dot_product_attention(q, k, v, mask.dense()))
    mesh = build_mesh({"data": 2, "context": 4})
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        f = jax.jit(lambda q, k, v: attention(q, k, v, mask, impl="xla", cached=False))
        got = run(f)
        text = f.lower(q, k, v).as_text()
    err = [float(np.max(np.abs(a - b)) / np.max(np.abs(a))) for a, b in zip(ref, got)]
    print(json.dumps({"rel_err": err, "permutes": text.count("collective_permute"),
                      "all_gathers": text.count("all_gather")}))
    """
)


def test_context_parallel_attention_equals_one_device():
    """Values and q/k/v gradients of the context-parallel core on (data=2, context=4) equal the
    one-device XLA core, with packed segments and padding; the program holds the all-gathers and the
    zigzag ppermutes (4 forward, their transposes in the backward)."""
    proc = subprocess.run(
        [PYTHON, "-c", _OP_SCRIPT], env=subprocess_env(8), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(result["rel_err"]) < 1e-5, result
    assert result["permutes"] >= 4 and result["all_gathers"] >= 2, result


def _train_compare(steps: int, rtol: float):
    spec = {"steps": steps, "mesh": {"data": 2, "context": 4}}
    proc = subprocess.run(
        [PYTHON, str(REPO_ROOT / "tests" / "multidevice" / "context_parallel_steps.py"), json.dumps(spec)],
        env=subprocess_env(8),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    single, mesh = result["single"], result["mesh"]
    assert mesh["collective_permutes"] > 0 and single["collective_permutes"] == 0
    for key in ("loss", "mtp_loss", "grad_norm", "grads_step0", f"grads_step{steps - 1}", "final_params"):
        a, b = np.asarray(single[key]), np.asarray(mesh[key])
        assert a.shape == b.shape and a.size > 0, key
        scale = np.max(np.abs(a))
        assert np.max(np.abs(a - b)) <= rtol * scale, (key, float(np.max(np.abs(a - b)) / scale))


@pytest.mark.slow
def test_context_parallel_training_equals_one_device_20_steps():
    """The issue's check: (data=2, context=4) on 8 emulated devices vs one device, 20 steps, packed
    rows with padding, MTP on: losses, gradients (full, first and last step) and the final
    parameters within relative 1e-4 in float32 (~5 min on 2 cores)."""
    _train_compare(20, 1e-4)


@pytest.mark.slow
def test_context_parallel_training_equals_one_device_2_steps():
    """The same comparison over 2 steps (~5 min under load on 2 cores: two compiles of the train and
    gradient programs; the non-slow suite covers the op in test_context_parallel_attention_equals_one_device)."""
    _train_compare(2, 1e-4)
