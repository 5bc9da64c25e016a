"""Pallas kernels for ling_jax, one folder per op (reference, kernel, ops, config).

- fp8_matmul: blockwise FP8 matmul (forward and backward in FP8), `blockwise_fp8_matmul`.
- topk_router: Ling 2.0 grouped sigmoid top-k routing, `sigmoid_topk_route`.
"""
