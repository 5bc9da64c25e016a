"""Ling 2.0 grouped sigmoid top-k router (selection with bias, unbiased weights)."""

from pallas_kernels.topk_router.config import RouterKernelConfig, RoutingParams
from pallas_kernels.topk_router.ops import sigmoid_topk_route

__all__ = ["RouterKernelConfig", "RoutingParams", "sigmoid_topk_route"]
