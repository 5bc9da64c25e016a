"""Blockwise FP8 (E4M3) matmul: [1,128]-tile activations x [128,128]-block weights."""

from pallas_kernels.fp8_matmul.config import FP8_E4M3_MAX, QUANT_BLOCK, Fp8MatmulConfig
from pallas_kernels.fp8_matmul.ops import blockwise_fp8_matmul
from pallas_kernels.fp8_matmul.quantize import quantize_blocks, quantize_tiles

__all__ = [
    "FP8_E4M3_MAX",
    "QUANT_BLOCK",
    "Fp8MatmulConfig",
    "blockwise_fp8_matmul",
    "quantize_blocks",
    "quantize_tiles",
]
