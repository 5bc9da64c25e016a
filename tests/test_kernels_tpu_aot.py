"""Ahead-of-time TPU compilation of both Pallas kernels (Mosaic, not interpret) on a CPU host.

Needs libtpu (the project's `tpu` extra). A TPU topology is described without hardware, the
kernels run per shard inside a jitted shard_map over that topology's mesh, forward and
backward, and the program is lowered and compiled. This catches Mosaic lowering errors
(block shapes, SMEM use, unsupported ops) that interpret mode on CPU cannot see. Any fallback
to the XLA reference is turned into an error, and the lowered module must contain the
expected number of Mosaic custom calls.
"""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.fp8_matmul import Fp8MatmulConfig, blockwise_fp8_matmul
from pallas_kernels.topk_router import RouterKernelConfig, sigmoid_topk_route

if importlib.util.find_spec("libtpu") is None:
    pytest.skip(
        "libtpu is not installed (install the project's `tpu` extra); TPU AOT "
        "compilation of the Pallas kernels needs it",
        allow_module_level=True,
    )

from jax.experimental import topologies  # noqa: E402

TOPOLOGIES = ("v5p:2x2x2", "v6e:2x2")
MOSAIC_CALL = "tpu_custom_call"


@pytest.fixture(scope="module", params=TOPOLOGIES)
def mesh(request):
    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=request.param)
    except Exception as err:  # pylint: disable=broad-except
        pytest.skip(f"topology {request.param} unavailable in this libtpu: {err}")
    return Mesh(np.array(topology.devices).reshape(-1), ("data",))


def _lower_and_compile(step, *args):
    """Lowers with fallback warnings as errors; returns (lowered StableHLO text, compiled)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lowered = jax.jit(step).lower(*args)
    return lowered.as_text(), lowered.compile()


@pytest.mark.parametrize("mxu_dtype", ["bfloat16", "float8_e4m3fn"])
def test_fp8_matmul_compiles_for_tpu(mesh, mxu_dtype):
    config = Fp8MatmulConfig(interpret=False, mxu_dtype=mxu_dtype)
    m_shard, k, n = 200, 300, 520  # partial tiles in every dimension

    def loss(x_MK, w_KN):
        y_MN = blockwise_fp8_matmul(x_MK, w_KN, impl="pallas", out_dtype=jnp.bfloat16, config=config)
        return jnp.sum(y_MN.astype(jnp.float32) ** 2)

    def shard_step(x_MK, w_KN):  # data parallel: x sharded by rows, w replicated
        value, (dx_MK, dw_KN) = jax.value_and_grad(loss, argnums=(0, 1))(x_MK, w_KN)
        return jax.lax.psum(value, "data"), (dx_MK, jax.lax.psum(dw_KN, "data"))

    def step(x_MK, w_KN):
        per_shard = jax.shard_map(
            shard_step, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P(), (P("data"), P())), check_vma=False
        )
        return per_shard(x_MK, w_KN)

    x = jax.ShapeDtypeStruct((mesh.size * m_shard, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    text, compiled = _lower_and_compile(step, x, w)
    assert text.count(MOSAIC_CALL) == 3  # forward, dgrad and wgrad GEMMs
    assert compiled.memory_analysis() is not None


def test_topk_router_compiles_for_tpu(mesh):
    config = RouterKernelConfig(interpret=False)
    t_shard, e = 200, 256
    route_args = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, impl="pallas", config=config)

    def loss(logits_TE, bias_E, r_TK):
        ids_TK, weights_TK = sigmoid_topk_route(logits_TE, bias_E, **route_args)
        return jnp.sum(weights_TK * r_TK), ids_TK

    def shard_step(logits_TE, bias_E, r_TK):  # tokens sharded, bias replicated
        (value, ids_TK), dlogits_TE = jax.value_and_grad(loss, has_aux=True)(logits_TE, bias_E, r_TK)
        return (jax.lax.psum(value, "data"), ids_TK), dlogits_TE

    def step(logits_TE, bias_E, r_TK):
        per_shard = jax.shard_map(
            shard_step,
            mesh=mesh,
            in_specs=(P("data"), P(), P("data")),
            out_specs=((P(), P("data")), P("data")),
            check_vma=False,
        )
        return per_shard(logits_TE, bias_E, r_TK)

    logits = jax.ShapeDtypeStruct((mesh.size * t_shard, e), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    bias = jax.ShapeDtypeStruct((e,), jnp.float32, sharding=NamedSharding(mesh, P()))
    r = jax.ShapeDtypeStruct((mesh.size * t_shard, 8), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    text, compiled = _lower_and_compile(step, logits, bias, r)
    assert text.count(MOSAIC_CALL) == 2  # forward and backward kernels
    assert compiled.memory_analysis() is not None


# ------------------------------------------------------------------ the real train step, AOT for TPU
TRAIN_B, TRAIN_T = 8, 128


def test_train_step_with_both_kernels_compiles_for_tpu(mesh):
    """`make_train_step` for a tiny model with fp8="pallas" (projections, lm_head and, through the blocked
    dispatch, the routed experts) and router_impl="pallas", traced on the
    CPU host under the topology's mesh (so the kernels lower for TPU, see
    ling_jax.ops.fp8.pallas_interpret), lowered with sharded abstract inputs and compiled."""
    import flax.linen as nn

    from ling_jax.config import ModelConfig
    from ling_jax.sharding import batch_spec, build_mesh
    from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
    from ling_jax.train.config import TrainConfig
    from ling_jax.train.state import make_optimizer, state_shardings
    from ling_jax.train.step import make_train_step

    model_cfg = ModelConfig(
        vocab_size=256,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        num_shared_experts=1,
        moe_intermediate_size=128,
        first_k_dense_replace=1,
        num_mtp_layers=1,
        mtp_loss_weight=0.1,
        max_position_embeddings=256,
        rope_theta=10000.0,
        init_std=0.02,
        moe_dispatch="blocked",
        fp8="pallas",
        router_impl="pallas",
    )  # blocked: FP8 routed experts too
    train_cfg = TrainConfig(batch_size=TRAIN_B, seq_len=TRAIN_T, warmup_steps=2)
    topo_mesh = build_mesh(dict(data=-1, fsdp=1, expert=1, model=1), list(mesh.devices.flat))
    optimizer = make_optimizer(train_cfg)
    abstract, shardings = state_shardings(model_cfg, optimizer, topo_mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sharding = NamedSharding(topo_mesh, batch_spec())
    batch = {
        name: jax.ShapeDtypeStruct((TRAIN_B, TRAIN_T), dtype, sharding=batch_sharding)
        for name, dtype in (
            ("inputs", jnp.int32),
            ("targets", jnp.int32),
            ("segment_ids", jnp.int32),
            ("positions", jnp.int32),
            ("loss_mask", jnp.float32),
        )
    }
    train_step = make_train_step(model_cfg, train_cfg, optimizer, topo_mesh, shardings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel falling back to XLA fails the test
        with jax.set_mesh(topo_mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            lowered = train_step.jitted.lower(state, batch)
    compiled = lowered.compile()
    calls = [line for line in compiled.as_text().splitlines() if f'custom_call_target="{MOSAIC_CALL}"' in line]
    count = lambda name: sum(f"%{name}" in line for line in calls)  # noqa: E731  (the kernel's name)
    assert count("blockwise_fp8_matmul") >= 3, calls  # forward, dgrad and wgrad of every projection
    assert count("sigmoid_topk_route_fwd") >= 1 and count("sigmoid_topk_route_bwd") >= 1, calls
    assert compiled.memory_analysis() is not None
