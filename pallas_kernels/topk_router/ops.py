"""Public op: `sigmoid_topk_route` with a custom_vjp and an `impl=` switch.

impl="xla" runs the lax.top_k reference; impl="pallas" the max-and-mask kernels (compiled on
TPU, interpret mode on CPU). When the kernel raises NotImplementedError (e.g. on GPU) the call
falls back to the reference with a warning, once per reason. Gradients flow to the logits
through the weights only; expert_ids are integers and expert_bias gets a zero gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.topk_router import kernel, reference
from pallas_kernels.topk_router.config import RouterKernelConfig, RoutingParams

IMPLS = ("xla", "pallas")
LOGIT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _warn_once(reason: str) -> None:
    common.warn_fallback_once("sigmoid_topk_route", reason)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable; the custom_vjp's only nondiff argument)."""

    impl: str
    params: RoutingParams
    config: RouterKernelConfig


def _forward(static: _Static, logits_TE, bias_E):
    if static.impl == "pallas":
        try:
            return kernel.pallas_route(logits_TE, bias_E, static.params, static.config)
        except NotImplementedError as err:
            _warn_once(str(err))
    return reference.route_reference(logits_TE, bias_E, static.params)


def _backward_logits(static: _Static, logits_TE, ids_Tk, dw_Tk):
    if static.impl == "pallas":
        try:
            return kernel.pallas_route_backward(logits_TE, ids_Tk, dw_Tk, static.params, static.config)
        except NotImplementedError as err:
            _warn_once(str(err))
    return reference.route_backward_reference(logits_TE, ids_Tk, dw_Tk, static.params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _route(static: _Static, logits_TE, bias_E):
    return _forward(static, logits_TE, bias_E)


def _route_fwd(static: _Static, logits_TE, bias_E):
    ids_Tk, weights_Tk = _forward(static, logits_TE, bias_E)
    return (ids_Tk, weights_Tk), (logits_TE, ids_Tk, jnp.zeros_like(bias_E))


def _route_bwd(static: _Static, residuals, cotangents):
    logits_TE, ids_Tk, zero_bias_E = residuals
    _, dw_Tk = cotangents  # the ids' cotangent is float0 (integer output)
    return _backward_logits(static, logits_TE, ids_Tk, dw_Tk), zero_bias_E


_route.defvjp(_route_fwd, _route_bwd)


def _check_arrays(logits_TE, bias_E) -> None:
    if getattr(logits_TE, "ndim", None) != 2:
        raise ValueError(f"logits must be 2-D [tokens, experts], got shape {getattr(logits_TE, 'shape', None)}")
    if logits_TE.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32/bfloat16/float16, got {logits_TE.dtype}")
    num_experts = logits_TE.shape[1]
    if getattr(bias_E, "shape", None) != (num_experts,):
        raise ValueError(
            f"expert_bias must have shape ({num_experts},) to match logits "
            f"{logits_TE.shape}, got {getattr(bias_E, 'shape', None)}"
        )
    if not jnp.issubdtype(bias_E.dtype, jnp.floating):
        raise ValueError(f"expert_bias must be floating point, got {bias_E.dtype}")
    if logits_TE.shape[0] < 1:
        raise ValueError("logits must have at least one token")


def sigmoid_topk_route(
    logits_TE: jax.Array,
    expert_bias_E: jax.Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    impl: str = "xla",
    config: RouterKernelConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Ling 2.0 / BailingMoeV2 grouped sigmoid top-k routing.

    Args:
      logits_TE: router logits [T, E] (computed in float32 by the caller; cast here anyway).
      expert_bias_E: aux-loss-free balancing bias [E]; used for selection only.
      top_k, n_group, topk_group, routed_scaling_factor: as in the model config.
      impl: "xla" (lax.top_k reference) or "pallas" (max-and-mask kernel).
      config: kernel block size / interpret switch (see RouterKernelConfig).

    Returns:
      expert_ids [T, top_k] int32 in descending biased score (ties: lowest index first) and
      weights [T, top_k] float32 = unbiased sigmoid scores of those experts, normalized over
      the row when top_k > 1, times routed_scaling_factor.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_arrays(logits_TE, expert_bias_E)
    params = RoutingParams(
        top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=float(routed_scaling_factor)
    )
    params.check_num_experts(logits_TE.shape[1])
    static = _Static(impl=impl, params=params, config=config if config is not None else RouterKernelConfig())
    return _route(static, logits_TE, expert_bias_E)
