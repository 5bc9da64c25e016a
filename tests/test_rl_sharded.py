"""The RL update (ling_jax/rl/update.py) on 8 emulated CPU devices, mesh data=2, expert=2, model=2,
gives the same losses, clip fractions, KL and gradient norms over several updates as one device.

The multi-device work runs in a subprocess (the emulated device count is fixed when JAX starts);
it prints one JSON line and the test compares. The batch is a fixed synthetic one: prompts and
responses of random bytes, old log-probs = the init policy's teacher-forced ones plus noise (so
ratios differ from 1 and some units clip), LPO sentence units of uneven length, padded rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

RTOL = 1e-4  # float32 reductions in another order on 8 shards (as test_moe_sharded's train step)
MESH = {"data": 2, "expert": 2, "model": 2}
UPDATES = 3
R, TP, N = 8, 16, 12


def _batch(rng):
    from ling_jax.rl import update as keys
    from ling_jax.rl.rollout import layout_batch

    prompts = [rng.integers(0, 256, size=int(rng.integers(5, TP + 1))).astype(np.int32) for _ in range(R)]
    lengths = rng.integers(1, N + 1, size=R)
    tokens = rng.integers(0, 256, size=(R, N)).astype(np.int32)
    tokens[np.arange(N)[None, :] >= lengths[:, None]] = 257
    batch = layout_batch(prompts, tokens, lengths, pad_id=257)
    batch[keys.UNIT_IDS] = np.cumsum(rng.random((R, N)) < 0.3, axis=1).astype(np.int32)
    batch[keys.ADVANTAGES] = rng.normal(size=R).astype(np.float32)
    return batch


def _losses(mesh_axes, devices, batch_np):
    import dataclasses

    import jax

    from ling_jax.rl import update as keys
    from ling_jax.rl.config import rl_defaults, rl_from_config
    from ling_jax.sharding import MESH_AXES, build_mesh
    from ling_jax.train.state import create_sharded_state, make_optimizer

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice"))
    from common import small_config

    config = small_config(model=dict(max_position_embeddings=64), train=dict(warmup_steps=0, learning_rate=1e-2))
    config.rl = rl_defaults()
    config.rl.update(max_new_tokens=N, beta=0.05)
    exp, rl = rl_from_config(config)
    rl = dataclasses.replace(rl, objective="lpo", eps_low=0.1, eps_high=0.1)
    mesh = build_mesh({a: int(mesh_axes.get(a, 1)) for a in MESH_AXES}, devices)
    optimizer = make_optimizer(exp.train)
    state, shardings = create_sharded_state(exp.model, optimizer, mesh, seed=0)
    shard = keys.batch_shardings(mesh)
    logprob_fn = keys.make_logprob_fn(exp.model, mesh, shardings.params, shardings.expert_bias, N)
    put = lambda b: {k: jax.device_put(np.asarray(v), shard[k]) for k, v in b.items()}  # noqa: E731
    logp, _ = logprob_fn(state.params, state.expert_bias, put(batch_np))
    batch = dict(batch_np)
    noise = np.random.default_rng(1).normal(0, 0.2, size=(R, N)).astype(np.float32)
    batch[keys.OLD_LOGP] = (np.asarray(logp) + noise) * batch[keys.MASK]
    batch[keys.REF_LOGP] = np.asarray(logp) - noise
    step = keys.make_rl_step(exp.model, rl, optimizer, mesh, shardings, N)
    out = []
    device_batch = put(batch)
    for _ in range(UPDATES):
        state, stats = step(state, device_batch)
        stats = jax.device_get(stats)
        out.append({k: float(stats[k]) for k in ("loss", "pg_loss", "kl", "clip_fraction", "entropy", "grad_norm")})
    return out


def worker():
    import jax

    batch = _batch(np.random.default_rng(0))
    return {"one": _losses({"data": 1}, jax.devices()[:1], batch), "mesh": _losses(MESH, jax.devices()[:8], batch)}


@pytest.fixture(scope="module")
def results():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice"))
    from common import REPO_ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        cwd=REPO_ROOT,
        env=subprocess_env(num_devices=8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"RL sharded worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess compiling the step twice: ~20 s quiet, minutes under load
def test_rl_update_on_8_devices_equals_one_device(results):
    one, mesh = results["one"], results["mesh"]
    assert len(one) == len(mesh) == UPDATES
    assert any(s["clip_fraction"] > 0 for s in one[1:]), "a comparison with clipping active"
    assert one[0]["grad_norm"] > 0 and one[0]["kl"] > 0
    for a, b in zip(one, mesh):
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=RTOL, atol=1e-6, err_msg=key)
    assert one[-1]["loss"] != one[0]["loss"]  # the updates changed the policy


if __name__ == "__main__":
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    print(json.dumps(worker()))
