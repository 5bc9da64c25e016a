"""The train step on an expert-parallel TPU mesh keeps activations split over the batch.

Compiled ahead of time for v5p:2x2x2 (libtpu describes the slice; no TPU is touched) with mesh
fsdp=2 expert=2 model=2. Before the embedding lookup pinned its output to the batch sharding
(`embed` in ling_jax/model.py), GSPMD all-gathered the MTP embedding to the global [B, T, D] batch
on such meshes: at Ling-1T's batch 512 x 4K that was 131 GiB of temporaries per chip
(benchmarks/README.md, plan section), and this small program showed the same all-gather.
"""

import importlib.util
import re

import flax.linen as nn
import jax
import pytest
from multidevice.common import small_experiment

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (install the project's `tpu` extra)", allow_module_level=True)

from jax.experimental import topologies  # noqa: E402

from ling_jax.plan.compiled import abstract_batch, resolve_dispatch  # noqa: E402
from ling_jax.sharding import build_mesh  # noqa: E402
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES  # noqa: E402
from ling_jax.train.state import make_optimizer, state_shardings  # noqa: E402
from ling_jax.train.step import make_train_step  # noqa: E402


def test_no_global_activation_all_gather_on_an_expert_parallel_mesh():
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"v5p:2x2x2 unavailable in this libtpu: {err}")
    exp = small_experiment(
        model={
            "hidden_size": 256,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "max_position_embeddings": 256,
        },
        train={"batch_size": 8, "seq_len": 256},
    )
    exp = resolve_dispatch(exp, "tpu")
    optimizer = make_optimizer(exp.train)
    mesh = build_mesh({"data": 1, "fsdp": 2, "expert": 2, "model": 2}, devices)
    abstract, shardings = state_shardings(exp.model, optimizer, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
    batch = abstract_batch(exp.train.batch_size, exp.train.seq_len, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        hlo = step.jitted.lower(state, batch).compile().as_text()
    B, T, D = exp.train.batch_size, exp.train.seq_len, exp.model.hidden_size
    assert re.search(r" all-to-all\(", hlo)  # the experts really are split: tokens travel
    global_gathers = [
        line.strip()[:200]
        for line in hlo.splitlines()
        if " all-gather(" in line and f"[{B},{T},{D}]" in line.split("=", 1)[1][:40]
    ]
    assert not global_gathers, global_gathers
