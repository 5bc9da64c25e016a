"""Train-step throughput and MFU of the real compiled train step (`ling_jax.train.step.make_train_step`).

Shapes:
  tiny   configs/tiny.py: 4 layers (1 dense + 3 MoE), hidden 128, 4/2 heads x 32, 16 experts top-2 in
         4 groups keep 2, expert width 64, 1 shared, dense width 384, vocab 258, MTP 1; batch 16 x 128.
  bench  4 layers (1 dense + 3 MoE), hidden 256, 8/2 heads x 32, 32 experts top-4 in 4 groups keep 2,
         expert width 128, 1 shared, dense width 512, vocab 512, MTP 1 layer; batch 8 x 256. Layers
         unrolled (scan_layers=False: 13% faster than nn.scan here, measured paired on the 2-core CPU).
  h200   4 layers (1 dense + 3 MoE), hidden 2048, 16/4 heads x 128, 64 experts top-8 in 8 groups keep 4,
         expert width 512, 1 shared, dense width 5632, vocab 32768, MTP 1; batch 8 x 2048 (16K tokens):
         a shape that fills one H200; run it with --dtype bfloat16 --peak-size 8192.
Parameters are float32; activations --dtype (default float32). Batches are random tokens (a few distinct
ones, cycled), packed
as single full-length documents; the state is initialised with `create_sharded_state` on a mesh over
all devices (data=-1), exactly as `ling-jax train` does.

Timing: the first `--warmup` steps (compilation included) are untimed; then the median of `--steps`
individually timed steps (each waits for its loss). MFU = model FLOPs per token
(`ling_jax.train.flops.model_flops_per_token`: 6 x activated matmul params + attention) x tokens/s /
(matmul peak x devices), the peak measured in the same run with `measure_matmul_peak` (--dtype, --peak-size),
before and after the steps (the higher of the two is used).

    JAX_PLATFORMS=cpu python benchmarks/train_step.py                         # both shapes
    JAX_PLATFORMS=cpu python benchmarks/train_step.py --shapes bench --moe_dispatch blocked --remat full

Prints a table, then one JSON line: {"peak_gflops": ..., "results": [{"shape", "tokens_per_s", "mfu", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ling_jax.platform import huge_pages_in_effect, reexec_with_huge_pages  # noqa: E402

if __name__ == "__main__":  # before anything else is imported or set: as `ling-jax train` does
    reexec_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from ling_jax.config import MOE_DISPATCHES, REMAT_POLICIES  # noqa: E402
from ling_jax.ops.dispatch import default_dispatch  # noqa: E402
from ling_jax.sharding import batch_spec, build_mesh  # noqa: E402
from ling_jax.train.config import Experiment, base_config, experiment_from_config  # noqa: E402
from ling_jax.train.flops import measure_matmul_peak, model_flops_per_token  # noqa: E402
from ling_jax.train.state import create_sharded_state, make_optimizer  # noqa: E402
from ling_jax.train.step import make_train_step  # noqa: E402

SHAPES = {
    "tiny": dict(
        model=dict(
            vocab_size=258,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=384,
            num_experts=16,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            num_shared_experts=1,
            moe_intermediate_size=64,
            first_k_dense_replace=1,
            num_mtp_layers=1,
            mtp_loss_weight=0.1,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            init_std=0.02,
        ),
        batch_size=16,
        seq_len=128,
    ),
    "bench": dict(
        model=dict(
            vocab_size=512,
            hidden_size=256,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=512,
            num_experts=32,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            num_shared_experts=1,
            moe_intermediate_size=128,
            first_k_dense_replace=1,
            num_mtp_layers=1,
            mtp_loss_weight=0.1,
            max_position_embeddings=1024,
            init_std=0.02,
            scan_layers=False,
        ),
        batch_size=8,
        seq_len=256,
    ),
    "h200": dict(
        model=dict(
            vocab_size=32768,
            hidden_size=2048,
            num_layers=4,
            num_heads=16,
            num_kv_heads=4,
            head_dim=128,
            intermediate_size=5632,
            num_experts=64,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            num_shared_experts=1,
            moe_intermediate_size=512,
            first_k_dense_replace=1,
            num_mtp_layers=1,
            mtp_loss_weight=0.1,
            max_position_embeddings=4096,
            init_std=0.02,
        ),
        batch_size=8,
        seq_len=2048,
    ),
}


def experiment(shape: str, moe_dispatch: str | None, remat: str, dtype: str = "float32") -> Experiment:
    spec = SHAPES[shape]
    config = base_config()
    config.model.update(spec["model"], dtype=dtype, param_dtype="float32", remat_policy=remat)
    if moe_dispatch:
        config.model.moe_dispatch = moe_dispatch
    config.train.update(batch_size=spec["batch_size"], seq_len=spec["seq_len"], warmup_steps=10)
    config.mesh.update(data=-1)
    return experiment_from_config(config)


def random_batches(exp: Experiment, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    B, T, V = exp.train.batch_size, exp.train.seq_len, exp.model.vocab_size
    batches = []
    for _ in range(count):
        tokens = rng.integers(0, V, size=(B, T + 1), dtype=np.int32)
        loss_mask = np.ones((B, T), np.float32)
        batches.append(
            {
                "inputs": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "loss_mask": loss_mask,
                "segment_ids": np.ones((B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            }
        )
    return batches


def bench(
    shape: str, moe_dispatch: str | None, remat: str, steps: int, warmup: int, peak: float, dtype: str = "float32"
) -> dict:
    exp = experiment(shape, moe_dispatch, remat, dtype)
    mesh = build_mesh(exp.mesh.axes)
    optimizer = make_optimizer(exp.train)
    state, shardings = create_sharded_state(exp.model, optimizer, mesh, seed=0)
    train_step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
    sharding = NamedSharding(mesh, batch_spec())
    batches = [{k: jax.device_put(v, sharding) for k, v in b.items()} for b in random_batches(exp, 4)]

    start = time.perf_counter()
    for i in range(warmup):
        state, metrics = train_step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics["loss"])
    warmup_s = time.perf_counter() - start
    times, losses = [], []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batches[i % len(batches)])
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - start)
    assert all(np.isfinite(losses)), losses
    step_s = statistics.median(times)
    tokens = exp.train.batch_size * exp.train.seq_len
    flops_per_token = model_flops_per_token(exp.model, exp.train.seq_len)
    tokens_per_s = tokens / step_s
    dispatch = exp.model.moe_dispatch
    if dispatch == "auto":
        dispatch = f"auto={default_dispatch(jax.default_backend())}"
    return {
        "shape": shape,
        "moe_dispatch": dispatch,
        "remat": remat,
        "dtype": dtype,
        "batch": f"{exp.train.batch_size}x{exp.train.seq_len}",
        "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "tokens_per_s": tokens_per_s,
        "gflops_per_token": flops_per_token / 1e9,
        "mfu": flops_per_token * tokens_per_s / (peak * jax.device_count()),
        "warmup_s": warmup_s,
        "final_loss": losses[-1],
    }


def print_table(rows: list[dict]) -> None:
    cols = [
        "shape",
        "moe_dispatch",
        "remat",
        "dtype",
        "batch",
        "step_ms",
        "tokens_per_s",
        "mfu",
        "gflops_per_token",
        "warmup_s",
    ]
    fmt = {
        "step_ms": "{:.1f}",
        "tokens_per_s": "{:,.0f}",
        "mfu": "{:.2%}",
        "gflops_per_token": "{:.5f}",
        "warmup_s": "{:.1f}",
    }
    text = [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,bench", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument(
        "--moe_dispatch",
        default=None,
        choices=MOE_DISPATCHES,
        help="MoE dispatch path (default: the model config default)",
    )
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES, help="remat policy of the layer stacks")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="activation dtype")
    p.add_argument("--peak-size", type=int, default=2048, help="square matmul size of the peak measurement")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")

    # The peak is measured before and after the steps and the higher one is used: on a shared machine
    # other processes can only lower a measurement, so the max is the better estimate (and the MFU
    # the more conservative figure).
    load_start = os.getloadavg()[0]
    peak_dtype = jnp.dtype(args.dtype)
    peak_start = measure_matmul_peak(peak_dtype, args.peak_size)
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; {peak_dtype} matmul peak "
        f"({args.peak_size}^3) at start "
        f"{peak_start / 1e9:.1f} GFLOP/s per device; load average {load_start:.2f}",
        flush=True,
    )
    rows = [
        bench(s, args.moe_dispatch, args.remat, args.steps, args.warmup, peak_start, args.dtype)
        for s in args.shapes.split(",")
    ]
    peak_end = measure_matmul_peak(peak_dtype, args.peak_size)
    peak = max(peak_start, peak_end)
    for row in rows:
        row["mfu"] = row["gflops_per_token"] * 1e9 * row["tokens_per_s"] / (peak * jax.device_count())
    print(
        f"{peak_dtype} matmul peak at end {peak_end / 1e9:.1f} GFLOP/s; MFU below uses {peak / 1e9:.1f}; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print_table(rows)
    print(
        json.dumps(
            {
                "peak_gflops": round(peak / 1e9, 2),
                "peak_gflops_start": round(peak_start / 1e9, 2),
                "peak_gflops_end": round(peak_end / 1e9, 2),
                "devices": jax.device_count(),
                "load_average_start": round(load_start, 2),
                "load_average": round(os.getloadavg()[0], 2),
                "malloc_huge_pages": huge_pages_in_effect(),
                "results": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
