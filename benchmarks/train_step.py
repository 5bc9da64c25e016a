"""Train-step throughput and MFU of the real compiled train step (`ling_jax.train.step.make_train_step`).

Shapes:
  tiny   configs/tiny.py: 4 layers (1 dense + 3 MoE), hidden 128, 4/2 heads x 32, 16 experts top-2 in
         4 groups keep 2, expert width 64, 1 shared, dense width 384, vocab 258, MTP 1; batch 16 x 128.
  bench  4 layers (1 dense + 3 MoE), hidden 256, 8/2 heads x 32, 32 experts top-4 in 4 groups keep 2,
         expert width 128, 1 shared, dense width 512, vocab 512, MTP 1 layer; batch 8 x 256. Layers
         unrolled (scan_layers=False: 13% faster than nn.scan here, measured paired on the 2-core CPU).
  bench_ref  the bench shape without the MTP layer: exactly the model that ../shared/tools/reference-bench
         times for the official PyTorch reference (AdamW, no MTP, batch 8 x 256, float32, 2 threads).
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

    JAX_PLATFORMS=cpu python benchmarks/train_step.py                         # tiny, bench, bench_ref
    JAX_PLATFORMS=cpu python benchmarks/train_step.py --shapes bench --moe_dispatch blocked --remat full

Against the official reference: where ../shared/tools/reference-bench exists (or with --reference on), the
reference's train step and ours on `bench_ref` are timed in alternating rounds (--reference-rounds, each
round runs the reference's own 7 timed steps and our --steps), on this machine, in this run; the ratio is
ours / reference tokens/s per round, and its median is reported as `vs_reference`.

Prints a table, then one JSON line: {"peak_gflops": ..., "results": [...], "reference": {...}, "vs_reference": ...}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ling_jax.platform import huge_pages_in_effect, reexec_with_huge_pages  # noqa: E402

if __name__ == "__main__":  # before anything else is imported or set: as `ling-jax train` does
    reexec_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from ling_jax.config import MOE_DISPATCHES, REMAT_POLICIES  # noqa: E402
from ling_jax.layers.moe import select_moe_impl  # noqa: E402
from ling_jax.ops.pallas_target import kernel_target  # noqa: E402
from ling_jax.sharding import batch_spec, build_mesh  # noqa: E402
from ling_jax.train.config import Experiment, base_config, experiment_from_config  # noqa: E402
from ling_jax.train.flops import measure_matmul_peak, model_flops_per_token  # noqa: E402
from ling_jax.train.state import create_sharded_state, make_optimizer  # noqa: E402
from ling_jax.train.step import make_train_step  # noqa: E402

SHAPES = {
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


REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_preset() -> dict:
    """The tiny shape: configs/tiny.py's model, batch and sequence length, read from the preset itself."""
    spec = importlib.util.spec_from_file_location("tiny_preset", REPO_ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    preset = module.get_config()
    return dict(model=preset.model.to_dict(), batch_size=preset.train.batch_size, seq_len=preset.train.seq_len)


SHAPES["tiny"] = _tiny_preset()
SHAPES["bench_ref"] = dict(
    model={**SHAPES["bench"]["model"], "num_mtp_layers": 0},
    batch_size=SHAPES["bench"]["batch_size"],
    seq_len=SHAPES["bench"]["seq_len"],
)
REFERENCE_SHAPE = "bench_ref"
REFERENCE_BENCH = REPO_ROOT.parent / "shared" / "tools" / "reference-bench"


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


class StepRunner:
    """The compiled train step of one shape, built and warmed up once, then timed in as many rounds as
    asked (so that rounds can alternate with the reference's)."""

    def __init__(self, shape: str, moe_dispatch: str | None, remat: str, warmup: int, dtype: str = "float32"):
        self.shape, self.remat, self.dtype = shape, remat, dtype
        self.exp = exp = experiment(shape, moe_dispatch, remat, dtype)
        mesh = build_mesh(exp.mesh.axes)
        optimizer = make_optimizer(exp.train)
        self.state, shardings = create_sharded_state(exp.model, optimizer, mesh, seed=0)
        self.train_step = make_train_step(exp.model, exp.train, optimizer, mesh, shardings)
        sharding = NamedSharding(mesh, batch_spec())
        self.batches = [{k: jax.device_put(v, sharding) for k, v in b.items()} for b in random_batches(exp, 4)]
        self.times: list[float] = []
        self.losses: list[float] = []
        self.steps_run = 0
        start = time.perf_counter()
        self._run(warmup, timed=False)
        self.warmup_s = time.perf_counter() - start

    def _run(self, steps: int, timed: bool) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.train_step(self.state, self.batches[self.steps_run % len(self.batches)])
            loss = float(metrics["loss"])  # waits for the step
            times.append(time.perf_counter() - start)
            self.steps_run += 1
            if timed:
                self.losses.append(loss)
        return times

    def time_steps(self, steps: int) -> float:
        """Times `steps` more steps; returns their median seconds."""
        times = self._run(steps, timed=True)
        self.times += times
        return statistics.median(times)

    def row(self, peak: float) -> dict:
        assert all(np.isfinite(self.losses)), self.losses
        exp = self.exp
        step_s = statistics.median(self.times)
        tokens = exp.train.batch_size * exp.train.seq_len
        flops_per_token = model_flops_per_token(exp.model, exp.train.seq_len)
        tokens_per_s = tokens / step_s
        dispatch = exp.model.moe_dispatch
        if dispatch == "auto":
            dispatch = f"auto={select_moe_impl(exp.model, kernel_target()).impl}"
        return {
            "shape": self.shape,
            "moe_dispatch": dispatch,
            "remat": self.remat,
            "dtype": self.dtype,
            "batch": f"{exp.train.batch_size}x{exp.train.seq_len}",
            "step_ms": 1e3 * step_s,
            "step_ms_min": 1e3 * min(self.times),
            "tokens_per_s": tokens_per_s,
            "gflops_per_token": flops_per_token / 1e9,
            "mfu": flops_per_token * tokens_per_s / (peak * jax.device_count()),
            "warmup_s": self.warmup_s,
            "final_loss": self.losses[-1],
        }


def run_reference() -> dict:
    """One run of ../shared/tools/reference-bench train: the official PyTorch reference's train step on the
    bench_ref model, timed on this machine (its median of 7 steps). Returns its JSON line."""
    proc = subprocess.run([str(REFERENCE_BENCH), "train"], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{REFERENCE_BENCH} train failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    p.add_argument("--shapes", default="tiny,bench,bench_ref", help="comma-separated: " + ",".join(SHAPES))
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
    p.add_argument(
        "--reference",
        default="auto",
        choices=("auto", "on", "off"),
        help="time the official reference (../shared/tools/reference-bench) in the same run; auto: where it exists",
    )
    p.add_argument("--reference-rounds", type=int, default=3, help="alternating reference / ours rounds")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.reference_rounds < 1:
        p.error("--reference-rounds must be >= 1")
    shapes = args.shapes.split(",")
    unknown = [sh for sh in shapes if sh not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    with_reference = args.reference == "on" or (args.reference == "auto" and REFERENCE_BENCH.exists())
    if args.reference == "on" and not REFERENCE_BENCH.exists():
        p.error(f"--reference on: {REFERENCE_BENCH} not found")
    if with_reference and REFERENCE_SHAPE not in shapes:
        shapes.append(REFERENCE_SHAPE)

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
    runners = [StepRunner(sh, args.moe_dispatch, args.remat, args.warmup, args.dtype) for sh in shapes]
    reference_runs, round_ratios = [], []
    for runner in runners:
        if with_reference and runner.shape == REFERENCE_SHAPE:
            # Alternate: a burst of background load then hits both sides instead of biasing one.
            tokens = runner.exp.train.batch_size * runner.exp.train.seq_len
            for r in range(args.reference_rounds):
                ref = run_reference()
                ours_s = runner.time_steps(args.steps)
                reference_runs.append(ref)
                round_ratios.append((tokens / ours_s) / ref["train_bench_tokens_per_s"])
                print(
                    f"round {r + 1}: reference {ref['train_bench_tokens_per_s']:,.0f} tokens/s "
                    f"({ref['train_bench_step_ms']:.1f} ms), ours {tokens / ours_s:,.0f} tokens/s "
                    f"({1e3 * ours_s:.1f} ms): {round_ratios[-1]:.3f}x",
                    flush=True,
                )
        else:
            runner.time_steps(args.steps)
    rows = [runner.row(peak_start) for runner in runners]
    peak_end = measure_matmul_peak(peak_dtype, args.peak_size)
    peak = max(peak_start, peak_end)
    for row in rows:
        row["mfu"] = row["gflops_per_token"] * 1e9 * row["tokens_per_s"] / (peak * jax.device_count())
    print(
        f"{peak_dtype} matmul peak at end {peak_end / 1e9:.1f} GFLOP/s; MFU below uses {peak / 1e9:.1f}; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print_table(rows)
    reference = None
    if round_ratios:
        ref_tokens = [r["train_bench_tokens_per_s"] for r in reference_runs]
        reference = {
            "torch": reference_runs[0].get("torch"),
            "threads": reference_runs[0].get("threads"),
            "rounds": len(round_ratios),
            "tokens_per_s": [round(t, 1) for t in ref_tokens],
            "tokens_per_s_median": round(statistics.median(ref_tokens), 1),
            "round_ratios": [round(x, 4) for x in round_ratios],
        }
        print(
            f"{REFERENCE_SHAPE} vs the official reference, same machine and run: median of "
            f"{len(round_ratios)} rounds {statistics.median(round_ratios):.3f}x "
            f"(rounds {', '.join(f'{x:.3f}' for x in round_ratios)})"
        )
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
                "reference": reference,
                "vs_reference": round(statistics.median(round_ratios), 4) if round_ratios else None,
            }
        )
    )


if __name__ == "__main__":
    main()
