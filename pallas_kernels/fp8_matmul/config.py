"""Block sizes and hardware limits for the blockwise FP8 matmul.

The quantization granularity (QUANT_BLOCK = 128) is fixed by the recipe: activations and
gradients are scaled per [1, 128] tile, weights per [128, 128] block. The Pallas kernel's
contraction block therefore always equals QUANT_BLOCK; only the M and N output tiles are free.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# Largest finite float8_e4m3fn value (448). `finfo.max` is an fp8 scalar: wrap in float().
FP8_E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)
FP8_DTYPE = jnp.float8_e4m3fn

# Quantization granularity along every contracted axis (tiles [1, 128], blocks [128, 128]).
QUANT_BLOCK = 128

# TPU layout constraints for VMEM blocks: the last dim is tiled by 128 lanes; the second-to-last
# by 8 sublanes for 32-bit types and 32 for 8-bit types (float8 operand tiles).
TPU_LANES = 128
TPU_FP8_SUBLANES = 32

# The [K/128, N/128] weight-scale table is held whole in SMEM. SMEM is small (tens of KiB on
# current TPUs and shared with the compiler's own scalars); above this the kernel is refused
# and the op falls back to the XLA reference.
TPU_SMEM_SCALE_TABLE_MAX_BYTES = 32 * 1024

# The per-row (a) and per-column (b, tile mode) scale blocks span the whole contraction
# ([bm, Kb] and [Kb, bn] float32, double-buffered); above this the kernel is refused.
TPU_VMEM_SCALE_BLOCKS_MAX_BYTES = 4 * 1024 * 1024

# Per-step VMEM working set budget (double-buffered operand tiles + accumulator + output).
# Well below the 16 MiB default scoped VMEM limit of v5e/v5p/v6e.
TPU_VMEM_BUDGET_BYTES = 12 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Fp8MatmulConfig:
    """Static options for `blockwise_fp8_matmul` (hashable: used as a custom_vjp static arg).

    Attributes:
      block_m: rows of the output tile. Shrunk to the (32-rounded) problem size for small M.
      block_n: columns of the output tile; a multiple of 128.
      interpret: run the Pallas kernel in interpret mode. None = decide from the default backend
        (interpret on CPU, compiled on TPU). Pass False to lower for TPU from a CPU host (AOT).
      mxu_dtype: dtype fed to the in-kernel dot. float8_e4m3fn keeps the operands in FP8
        (native on FP8 MXUs); bfloat16 upcasts them first, which is exact (every e4m3 value is
        a bf16 value) and lowers on every TPU generation.
      gpu_block_m, gpu_block_n: output tile of the GPU (Triton) kernel; powers of two >= 16,
        shrunk for small problems. The GPU kernel feeds FP8 to the tensor cores.
      gpu_num_warps, gpu_num_stages: Triton launch options of the GPU kernel. The defaults were the
        fastest of the tiles tried on one H200 at 8192^3 (benchmarks/README.md, "FP8 matmul").
    """

    block_m: int = 256
    block_n: int = 256
    interpret: bool | None = None
    mxu_dtype: str = "bfloat16"
    gpu_block_m: int = 128
    gpu_block_n: int = 128
    gpu_num_warps: int = 8
    gpu_num_stages: int = 4

    def __post_init__(self):
        if self.block_m <= 0 or self.block_m % TPU_FP8_SUBLANES:
            raise ValueError(
                f"block_m must be a positive multiple of {TPU_FP8_SUBLANES} (fp8 sublane tiling), got {self.block_m}"
            )
        if self.block_n <= 0 or self.block_n % TPU_LANES:
            raise ValueError(f"block_n must be a positive multiple of {TPU_LANES}, got {self.block_n}")
        if self.mxu_dtype not in ("float8_e4m3fn", "bfloat16"):
            raise ValueError(f"mxu_dtype must be 'float8_e4m3fn' or 'bfloat16', got {self.mxu_dtype!r}")
        for name in ("gpu_block_m", "gpu_block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.gpu_num_warps not in (1, 2, 4, 8, 16) or self.gpu_num_stages < 1:
            raise ValueError(
                f"gpu_num_warps must be 1, 2, 4, 8 or 16 and gpu_num_stages >= 1; got "
                f"{self.gpu_num_warps}, {self.gpu_num_stages}"
            )
        if self.interpret not in (None, True, False):
            raise ValueError(f"interpret must be None, True or False, got {self.interpret!r}")
        tile_bytes = (
            2 * 2 * (self.block_m + self.block_n) * QUANT_BLOCK  # fp8 tiles, 2 buffers
            + 3 * 4 * self.block_m * self.block_n
        )  # f32 acc + 2 out buffers
        if tile_bytes > TPU_VMEM_BUDGET_BYTES:
            raise ValueError(
                f"block_m={self.block_m}, block_n={self.block_n} need ~{tile_bytes} bytes "
                f"of VMEM, over the {TPU_VMEM_BUDGET_BYTES}-byte budget"
            )
