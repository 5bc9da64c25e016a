"""Trains the small test model (MTP on) for N steps on packed rows, on one device and on a mesh with
a context axis, and prints one JSON line: per mesh, the per-step loss, MTP loss and gradient norm,
the full gradient at the first and the last step (flattened), and the final parameters.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/multidevice/context_parallel_steps.py '{"steps": 3, "mesh": {"data": 2, "context": 4}}'

The rows are built here (not by the corpus packer) so that every row holds several documents and
some padding: each row is cut at random points into 2-4 segments, positions restart at 0 in each,
targets are the next token inside a document (loss_mask 0 at each document's last token and on
padding, segment 0).
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import small_experiment  # noqa: E402


def packed_batch(rng, B: int, T: int, vocab: int) -> dict:
    import numpy as np

    from ling_jax.data import batch as keys

    ids = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    for b in range(B):
        used = T - int(rng.integers(0, T // 4))  # trailing padding
        cuts = sorted(rng.choice(np.arange(2, used - 1), size=int(rng.integers(1, 4)), replace=False).tolist())
        for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used])):
            seg[b, lo:hi] = s + 1
            pos[b, lo:hi] = np.arange(hi - lo)
            loss_mask[b, lo : hi - 1] = 1.0
    return {
        keys.INPUTS: ids[:, :T],
        keys.TARGETS: ids[:, 1:],
        keys.SEGMENT_IDS: seg,
        keys.POSITIONS: pos,
        keys.LOSS_MASK: loss_mask,
    }


def run(exp, sizes: dict, steps: int) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from ling_jax.sharding import MESH_AXES, batch_spec, build_mesh
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
    from ling_jax.train.state import create_sharded_state, make_optimizer
    from ling_jax.train.step import _forward_loss, make_train_step

    axes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    mesh = build_mesh(axes, jax.devices()[: math.prod(axes.values())])
    optimizer = make_optimizer(exp.train)
    state, shardings = create_sharded_state(exp.model, optimizer, mesh, exp.train.seed)
    batch_sharding = NamedSharding(mesh, batch_spec())
    train_step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
    grad_fn = jax.jit(
        jax.grad(lambda p, b, batch: _forward_loss(p, b, batch, exp.model, exp.train.z_loss_weight)[0]),
        in_shardings=(shardings.params, shardings.expert_bias, batch_sharding),
    )

    def grads(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            g = grad_fn(state.params, state.expert_bias, batch)
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(jax.device_get(g))])

    rng = np.random.default_rng(exp.train.seed)
    out = {"loss": [], "mtp_loss": [], "grad_norm": []}
    for step in range(steps):
        local = packed_batch(rng, exp.train.batch_size, exp.train.seq_len, exp.model.vocab_size)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
        if step == 0:  # the sequence really is split: the attention's ppermutes are in the program
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
                out["collective_permutes"] = train_step.jitted.lower(state, batch).as_text().count("collective_permute")
        if step in (0, steps - 1):
            out[f"grads_step{step}"] = grads(state, batch).tolist()
        state, metrics = train_step(state, batch)
        for name in ("loss", "mtp_loss", "grad_norm"):
            out[name].append(float(metrics[name]))
    leaves = jax.tree.leaves(jax.device_get(state.params))
    out["final_params"] = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves]).tolist()
    return out


def main(spec: dict) -> dict:
    exp = small_experiment(model=spec.get("model"), train=spec.get("train"))
    context = small_experiment(model=spec.get("model"), train=spec.get("train"), mesh=spec["mesh"])
    return {"single": run(exp, {}, spec["steps"]), "mesh": run(context, spec["mesh"], spec["steps"])}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
