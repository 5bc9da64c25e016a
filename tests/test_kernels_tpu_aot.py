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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.fp8_matmul import Fp8MatmulConfig, blockwise_fp8_matmul
from pallas_kernels.topk_router import RouterKernelConfig, sigmoid_topk_route

if importlib.util.find_spec("libtpu") is None:
  pytest.skip("libtpu is not installed (install the project's `tpu` extra); TPU AOT "
              "compilation of the Pallas kernels needs it", allow_module_level=True)

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
    y_MN = blockwise_fp8_matmul(x_MK, w_KN, impl="pallas", out_dtype=jnp.bfloat16,
                                config=config)
    return jnp.sum(y_MN.astype(jnp.float32) ** 2)

  def shard_step(x_MK, w_KN):  # data parallel: x sharded by rows, w replicated
    value, (dx_MK, dw_KN) = jax.value_and_grad(loss, argnums=(0, 1))(x_MK, w_KN)
    return jax.lax.psum(value, "data"), (dx_MK, jax.lax.psum(dw_KN, "data"))

  def step(x_MK, w_KN):
    per_shard = jax.shard_map(shard_step, mesh=mesh, in_specs=(P("data"), P()),
                              out_specs=(P(), (P("data"), P())), check_vma=False)
    return per_shard(x_MK, w_KN)

  x = jax.ShapeDtypeStruct((mesh.size * m_shard, k), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("data")))
  w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  text, compiled = _lower_and_compile(step, x, w)
  assert text.count(MOSAIC_CALL) == 3  # forward, dgrad and wgrad GEMMs
  assert compiled.memory_analysis() is not None


def test_topk_router_compiles_for_tpu(mesh):
  config = RouterKernelConfig(interpret=False)
  t_shard, e = 200, 256
  route_args = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                    impl="pallas", config=config)

  def loss(logits_TE, bias_E, r_TK):
    ids_TK, weights_TK = sigmoid_topk_route(logits_TE, bias_E, **route_args)
    return jnp.sum(weights_TK * r_TK), ids_TK

  def shard_step(logits_TE, bias_E, r_TK):  # tokens sharded, bias replicated
    (value, ids_TK), dlogits_TE = jax.value_and_grad(loss, has_aux=True)(logits_TE, bias_E,
                                                                       r_TK)
    return (jax.lax.psum(value, "data"), ids_TK), dlogits_TE

  def step(logits_TE, bias_E, r_TK):
    per_shard = jax.shard_map(shard_step, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                              out_specs=((P(), P("data")), P("data")), check_vma=False)
    return per_shard(logits_TE, bias_E, r_TK)

  logits = jax.ShapeDtypeStruct((mesh.size * t_shard, e), jnp.float32,
                                sharding=NamedSharding(mesh, P("data")))
  bias = jax.ShapeDtypeStruct((e,), jnp.float32, sharding=NamedSharding(mesh, P()))
  r = jax.ShapeDtypeStruct((mesh.size * t_shard, 8), jnp.float32,
                           sharding=NamedSharding(mesh, P("data")))
  text, compiled = _lower_and_compile(step, logits, bias, r)
  assert text.count(MOSAIC_CALL) == 2  # forward and backward kernels
  assert compiled.memory_analysis() is not None
