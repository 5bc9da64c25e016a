"""Static parameters of the grouped sigmoid top-k router and block sizes of its kernels."""

from __future__ import annotations

import dataclasses

# TPU VMEM tiling: the token (sublane) tile must be a multiple of 8 for 32-bit data.
TPU_SUBLANES = 8
# Added to the sum of the selected scores before normalizing (as in the official model).
NORM_EPS = 1e-20
# Experts per group must be >= 2: a group's score is the sum of its top-2 biased scores.
GROUP_SCORE_TOP = 2


@dataclasses.dataclass(frozen=True)
class RoutingParams:
    """What the router computes (hashable; shared by the reference and the kernels)."""

    top_k: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float

    def __post_init__(self):
        for name in ("top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if not isinstance(self.routed_scaling_factor, (int, float)):
            raise ValueError(f"routed_scaling_factor must be a number, got {self.routed_scaling_factor!r}")

    def check_num_experts(self, num_experts: int) -> None:
        """Raises ValueError unless `num_experts` fits the grouping and top-k."""
        if num_experts % self.n_group:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by n_group ({self.n_group})")
        group_size = num_experts // self.n_group
        if group_size < GROUP_SCORE_TOP:
            raise ValueError(
                f"each group needs >= {GROUP_SCORE_TOP} experts for the top-2 group "
                f"score; got {num_experts} experts in {self.n_group} groups"
            )
        kept = self.topk_group * group_size
        if self.top_k > kept:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the experts kept by group selection "
                f"({self.topk_group} groups x {group_size} = {kept})"
            )


@dataclasses.dataclass(frozen=True)
class RouterKernelConfig:
    """Block sizes of the Pallas router kernels.

    Attributes:
      block_t: tokens per grid step (rows of the [block_t, E] logits tile); shrunk to the
        8-rounded token count for small inputs.
      interpret: None = interpret on CPU, compile on TPU; False forces Mosaic lowering (AOT).
    """

    block_t: int = 256
    interpret: bool | None = None

    def __post_init__(self):
        if self.block_t <= 0 or self.block_t % TPU_SUBLANES:
            raise ValueError(f"block_t must be a positive multiple of {TPU_SUBLANES}, got {self.block_t}")
        if self.interpret not in (None, True, False):
            raise ValueError(f"interpret must be None, True or False, got {self.interpret!r}")
