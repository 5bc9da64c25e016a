"""Benchmark: blockwise FP8 matmul vs a plain bf16 jnp.dot, forward and forward+backward.

  python benchmarks/fp8_matmul.py                      # sizes 1024 2048 (< 3 min on 2 CPUs)
  python benchmarks/fp8_matmul.py --sizes 4096 8192    # the sizes that matter on accelerators
  python benchmarks/fp8_matmul.py --sizes 8192 --impls pallas,xla --gpu-configs 128x128w4s3 128x256w8s3

Square problems [S, S] @ [S, S] in bfloat16. `fp8_gemm_only_ms` times the scaled FP8 GEMM on
operands quantized beforehand (the op without its quantization passes). Each figure is the median wall time of --repeats
runs after --warmup runs of a jitted function (compile excluded). On TPU/GPU the FP8 op uses
impl="pallas" by default (the Mosaic kernel on TPU, the Triton kernel on GPU; a fallback to the
XLA reference shows in the table); --impls adds others, --gpu-configs sweeps the GPU tile
(BMxBNwWARPSsSTAGES). Every row also gives the largest row-relative difference of the FP8 op's
forward from the XLA reference's on the same inputs (`max_rel_vs_xla`: a correctness check). On CPU
the FP8 op is timed with impl="xla": XLA:CPU
has no FP8 matrix unit, so those are reference-implementation numbers, not kernel speed; the
Pallas kernel runs only in interpret mode on CPU and is timed at one small size, for
completeness. The last line printed is one JSON object with all the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul import Fp8MatmulConfig, blockwise_fp8_matmul, quantize_blocks, quantize_tiles
from pallas_kernels.fp8_matmul import ops as fp8_ops

DEFAULT_SIZES = (1024, 2048)
PALLAS_INTERPRET_SIZE = 256


def median_ms(fn, *args, warmup: int, repeats: int) -> float:
    """Median wall time in milliseconds of fn(*args) (jitted; compile happens in warmup)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def parse_gpu_config(text: str) -> Fp8MatmulConfig:
    """'128x256w8s3' -> Fp8MatmulConfig(gpu_block_m=128, gpu_block_n=256, gpu_num_warps=8, ...)."""
    tile, rest = text.split("w")
    warps, stages = rest.split("s")
    bm, bn = tile.split("x")
    return Fp8MatmulConfig(
        gpu_block_m=int(bm), gpu_block_n=int(bn), gpu_num_warps=int(warps), gpu_num_stages=int(stages)
    )


def make_fns(impl: str, config: Fp8MatmulConfig | None = None):
    """Jitted fns of (x, w, dy): bf16/fp8 forward, and forward + backward (vjp with dy)."""

    def bf16_mm(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.bfloat16)

    def fp8_mm(x, w):
        return blockwise_fp8_matmul(x, w, impl=impl, out_dtype=jnp.bfloat16, config=config)

    def fwd(mm):
        return jax.jit(lambda x, w, dy: mm(x, w))

    def fwd_bwd(mm):  # a random (non-constant) cotangent: nothing for XLA to constant-fold
        return jax.jit(lambda x, w, dy: (lambda y, vjp: (y, *vjp(dy)))(*jax.vjp(mm, x, w)))

    return {
        "bf16_fwd": fwd(bf16_mm),
        "fp8_fwd": fwd(fp8_mm),
        "bf16_fwd_bwd": fwd_bwd(bf16_mm),
        "fp8_fwd_bwd": fwd_bwd(fp8_mm),
    }


def max_row_relative(actual, expected) -> float:
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    row_scale = jnp.max(jnp.abs(expected), axis=1, keepdims=True) + 1e-30
    return float(jnp.max(jnp.abs(actual - expected) / row_scale))


def bench_size(size: int, impl: str, warmup: int, repeats: int, gpu_config: str | None = None) -> dict:
    kx, kw, ky = jax.random.split(jax.random.key(size), 3)
    x = jax.random.normal(kx, (size, size), jnp.bfloat16)
    w = (jax.random.normal(kw, (size, size), jnp.float32) / size**0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(ky, (size, size), jnp.bfloat16)
    fns = make_fns(impl, parse_gpu_config(gpu_config) if gpu_config else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        jax.block_until_ready(fns["fp8_fwd_bwd"](x, w, dy))  # trace: a fallback warns here
    fell_back = any("falling back" in str(c.message) for c in caught)
    row = {
        "size": size,
        "fp8_impl": impl + (" (fell back to xla)" if fell_back else "") + (f" {gpu_config}" if gpu_config else ""),
    }
    if impl != "xla":
        reference = make_fns("xla")["fp8_fwd"](x, w, dy)
        row["max_rel_vs_xla"] = max_row_relative(fns["fp8_fwd"](x, w, dy), reference)
    for name, fn in fns.items():
        row[name + "_ms"] = round(median_ms(fn, x, w, dy, warmup=warmup, repeats=repeats), 3)
    flops = 2.0 * size**3
    # The scaled GEMM alone, on operands quantized beforehand (the op's time minus quantization).
    scaled_gemm = fp8_ops.scaled_gemm(impl, parse_gpu_config(gpu_config) if gpu_config else None)
    gemm = jax.jit(
        lambda a_q, a_s, b_q, b_s: scaled_gemm(a_q, a_s, b_q, b_s, b_block_scales=True, out_dtype=jnp.bfloat16)
    )
    operands = (*quantize_tiles(x), *quantize_blocks(w))
    row["fp8_gemm_only_ms"] = round(median_ms(gemm, *operands, warmup=warmup, repeats=repeats), 3)
    row["ratio_gemm_only_fp8_over_bf16"] = round(row["fp8_gemm_only_ms"] / row["bf16_fwd_ms"], 3)
    row["bf16_fwd_gflops"] = round(flops / row["bf16_fwd_ms"] / 1e6, 1)
    row["fp8_fwd_gflops"] = round(flops / row["fp8_fwd_ms"] / 1e6, 1)
    row["ratio_fwd_fp8_over_bf16"] = round(row["fp8_fwd_ms"] / row["bf16_fwd_ms"], 3)
    row["ratio_fwd_bwd_fp8_over_bf16"] = round(row["fp8_fwd_bwd_ms"] / row["bf16_fwd_bwd_ms"], 3)
    return row


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'size':>6} {'fp8 impl':>22} {'bf16 fwd':>10} {'fp8 fwd':>10} {'ratio':>6} "
        f"{'bf16 f+b':>10} {'fp8 f+b':>10} {'ratio':>6}   (ms, median)"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:>6} {r['fp8_impl']:>22} {r['bf16_fwd_ms']:>10.2f} {r['fp8_fwd_ms']:>10.2f} "
            f"{r['ratio_fwd_fp8_over_bf16']:>6.2f} {r['bf16_fwd_bwd_ms']:>10.2f} "
            f"{r['fp8_fwd_bwd_ms']:>10.2f} {r['ratio_fwd_bwd_fp8_over_bf16']:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--impls", default=None, help="comma-separated FP8 impls (default: xla on CPU, pallas elsewhere)"
    )
    parser.add_argument(
        "--gpu-configs", nargs="*", default=[], help="GPU kernel tiles to sweep with impl=pallas, e.g. 128x128w4s3"
    )
    args = parser.parse_args()

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    impls = args.impls.split(",") if args.impls else ["xla" if on_cpu else "pallas"]
    print(f"backend: {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    if on_cpu:
        print(
            "NOTE: CPU run. FP8 figures are the XLA:CPU reference implementation (impl='xla'), "
            "not kernel speed; XLA:CPU has no FP8 matrix unit."
        )
    rows = []
    for size in args.sizes:
        for impl in impls:
            configs = args.gpu_configs if (impl == "pallas" and backend == "gpu" and args.gpu_configs) else [None]
            for gpu_config in configs:
                rows.append(bench_size(size, impl, args.warmup, args.repeats, gpu_config))
                print_table(rows[-1:])
    print_table(rows)

    result = {"backend": backend, "device_kind": jax.devices()[0].device_kind, "fp8_impls": impls, "results": rows}
    if on_cpu:
        pallas_row = bench_size(PALLAS_INTERPRET_SIZE, "pallas", args.warmup, max(1, args.repeats // 2))
        print(f"Pallas kernel in interpret mode (CPU emulation, meaningless as speed), size {PALLAS_INTERPRET_SIZE}:")
        print_table([pallas_row])
        result["pallas_interpret_small"] = pallas_row
        result["note"] = (
            "CPU: fp8 numbers are the XLA:CPU reference, not kernel speed; pallas "
            "timed only in interpret mode at a small size"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
