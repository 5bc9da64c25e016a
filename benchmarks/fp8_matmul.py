"""Benchmark: blockwise FP8 matmul vs a plain bf16 jnp.dot, forward and forward+backward.

  python benchmarks/fp8_matmul.py                      # sizes 1024 2048 (< 3 min on 2 CPUs)
  python benchmarks/fp8_matmul.py --sizes 4096 8192    # the sizes that matter on accelerators

Square problems [S, S] @ [S, S] in bfloat16. Each figure is the median wall time of --repeats
runs after --warmup runs of a jitted function (compile excluded). On TPU/GPU the FP8 op uses
impl="pallas" (when the Pallas kernel is unavailable there, e.g. on GPU, the op falls back to
the XLA reference and the table says so). On CPU the FP8 op is timed with impl="xla": XLA:CPU
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

from pallas_kernels.fp8_matmul import blockwise_fp8_matmul

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


def make_fns(impl: str):
  """Jitted fns of (x, w, dy): bf16/fp8 forward, and forward + backward (vjp with dy)."""
  def bf16_mm(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.bfloat16)

  def fp8_mm(x, w):
    return blockwise_fp8_matmul(x, w, impl=impl, out_dtype=jnp.bfloat16)

  def fwd(mm):
    return jax.jit(lambda x, w, dy: mm(x, w))

  def fwd_bwd(mm):  # a random (non-constant) cotangent: nothing for XLA to constant-fold
    return jax.jit(lambda x, w, dy: (lambda y, vjp: (y, *vjp(dy)))(*jax.vjp(mm, x, w)))

  return {"bf16_fwd": fwd(bf16_mm), "fp8_fwd": fwd(fp8_mm),
          "bf16_fwd_bwd": fwd_bwd(bf16_mm), "fp8_fwd_bwd": fwd_bwd(fp8_mm)}


def bench_size(size: int, impl: str, warmup: int, repeats: int) -> dict:
  kx, kw, ky = jax.random.split(jax.random.key(size), 3)
  x = jax.random.normal(kx, (size, size), jnp.bfloat16)
  w = (jax.random.normal(kw, (size, size), jnp.float32) / size ** 0.5).astype(jnp.bfloat16)
  dy = jax.random.normal(ky, (size, size), jnp.bfloat16)
  fns = make_fns(impl)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)
    jax.block_until_ready(fns["fp8_fwd_bwd"](x, w, dy))  # trace: a fallback warns here
  fell_back = any("falling back" in str(c.message) for c in caught)
  row = {"size": size, "fp8_impl": impl + (" (fell back to xla)" if fell_back else "")}
  for name, fn in fns.items():
    row[name + "_ms"] = round(median_ms(fn, x, w, dy, warmup=warmup, repeats=repeats), 3)
  flops = 2.0 * size ** 3
  row["bf16_fwd_gflops"] = round(flops / row["bf16_fwd_ms"] / 1e6, 1)
  row["fp8_fwd_gflops"] = round(flops / row["fp8_fwd_ms"] / 1e6, 1)
  row["ratio_fwd_fp8_over_bf16"] = round(row["fp8_fwd_ms"] / row["bf16_fwd_ms"], 3)
  row["ratio_fwd_bwd_fp8_over_bf16"] = round(row["fp8_fwd_bwd_ms"] / row["bf16_fwd_bwd_ms"], 3)
  return row


def print_table(rows: list[dict]) -> None:
  header = (f"{'size':>6} {'fp8 impl':>22} {'bf16 fwd':>10} {'fp8 fwd':>10} {'ratio':>6} "
            f"{'bf16 f+b':>10} {'fp8 f+b':>10} {'ratio':>6}   (ms, median)")
  print(header)
  for r in rows:
    print(f"{r['size']:>6} {r['fp8_impl']:>22} {r['bf16_fwd_ms']:>10.2f} {r['fp8_fwd_ms']:>10.2f} "
          f"{r['ratio_fwd_fp8_over_bf16']:>6.2f} {r['bf16_fwd_bwd_ms']:>10.2f} "
          f"{r['fp8_fwd_bwd_ms']:>10.2f} {r['ratio_fwd_bwd_fp8_over_bf16']:>6.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  impl = "xla" if on_cpu else "pallas"
  print(f"backend: {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  if on_cpu:
    print("NOTE: CPU run. FP8 figures are the XLA:CPU reference implementation (impl='xla'), "
          "not kernel speed; XLA:CPU has no FP8 matrix unit.")
  rows = [bench_size(size, impl, args.warmup, args.repeats) for size in args.sizes]
  print_table(rows)

  result = {"backend": backend, "device_kind": jax.devices()[0].device_kind,
            "fp8_impl": impl, "results": rows}
  if on_cpu:
    pallas_row = bench_size(PALLAS_INTERPRET_SIZE, "pallas", args.warmup, max(1, args.repeats // 2))
    print(f"Pallas kernel in interpret mode (CPU emulation, meaningless as speed), "
          f"size {PALLAS_INTERPRET_SIZE}:")
    print_table([pallas_row])
    result["pallas_interpret_small"] = pallas_row
    result["note"] = ("CPU: fp8 numbers are the XLA:CPU reference, not kernel speed; pallas "
                      "timed only in interpret mode at a small size")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
