"""Shared benchmark helpers: robust wall-clock medians, CPU matmul peak, JSON-line output.

Timings block on every output (`jax.block_until_ready`) and exclude compilation (warmup calls).
On a shared machine, compare candidates with `interleaved_medians`: the candidates take turns, so a
burst of background load hits all of them instead of biasing one.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


def time_call(fn: Callable, *args) -> float:
    """Seconds for one call of `fn(*args)`, including waiting for its outputs."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_time(fn: Callable, *args, warmup: int = 1, runs: int = 5) -> float:
    """Median seconds of `runs` calls after `warmup` untimed calls (the first one compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    return statistics.median(time_call(fn, *args) for _ in range(runs))


def interleaved_times(
    cases: Mapping[str, tuple[Callable, Sequence[Any]]], *, warmup: int = 1, runs: int = 5
) -> dict[str, list[float]]:
    """{name: [seconds per round]} for cases {name: (fn, args)}, timed round-robin for `runs` rounds."""
    for fn, args in cases.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, (fn, args) in cases.items():
            samples[name].append(time_call(fn, *args))
    return samples


def interleaved_medians(
    cases: Mapping[str, tuple[Callable, Sequence[Any]]], *, warmup: int = 1, runs: int = 5
) -> dict[str, float]:
    """{name: median seconds} of `interleaved_times`."""
    return {name: statistics.median(t) for name, t in interleaved_times(cases, warmup=warmup, runs=runs).items()}


def paired_ratio(samples: Mapping[str, Sequence[float]], name: str, baseline: str) -> float:
    """Median over rounds of samples[name][i] / samples[baseline][i] (same-round pairs, so slow drifts
    in background load cancel)."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[baseline], strict=True))


def compiled(fn: Callable, *args) -> Callable:
    """`jax.jit(fn)` compiled ahead of time for `args`, so that even the first call is a clean timing."""
    return jax.jit(fn).lower(*args).compile()


def matmul_peak_gflops(size: int = 2048, dtype=jnp.float32, runs: int = 5) -> float:
    """Measured GFLOP/s of one jitted [size, size] x [size, size] matmul (2 * size**3 FLOPs)."""
    a = jnp.ones((size, size), dtype)
    b = jnp.full((size, size), 0.5, dtype)
    seconds = median_time(jax.jit(jnp.matmul), a, b, runs=runs)
    return 2 * size**3 / seconds / 1e9


def print_table(rows: Sequence[Mapping[str, Any]], file=sys.stdout) -> None:
    """Prints dict rows as an aligned text table (columns from the first row)."""
    if not rows:
        return
    cols = list(rows[0])
    text = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)), file=file)


def print_json_line(obj: Mapping[str, Any], file=sys.stdout) -> None:
    """One JSON object on one line (floats rounded to 4 significant digits), for machine parsing."""

    def rounded(v):
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, Mapping):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [rounded(x) for x in v]
        return v

    print(json.dumps(rounded(obj), separators=(", ", ": ")), file=file, flush=True)


WORKDIR_MARK = ".ling_jax_benchmark"  # what a benchmark leaves in the --workdir it made


def claim_workdir(workdir: str | Path, *, clear: bool = True) -> Path:
    """`workdir` for a benchmark's runs: created (with a marker file) when absent or empty; when the
    marker says a benchmark made it, its old contents removed (`clear`) or kept (a benchmark that
    reuses what it wrote, e.g. a cached SFT run, removes only its own run folders). SystemExit, deleting nothing,
    for a directory with anything else in it (a user's files): the benchmarks never remove what they
    did not create."""
    root = Path(workdir)
    if root.exists() and not root.is_dir():
        sys.exit(f"--workdir {root} is a file, not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / WORKDIR_MARK).is_file():
        sys.exit(f"--workdir {root} holds files a benchmark did not write ({WORKDIR_MARK} is missing); pick another")
    if root.is_dir() and clear:
        for child in root.iterdir():
            if child.name != WORKDIR_MARK:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / WORKDIR_MARK).write_text("made by a ling_jax benchmark; its contents are replaced on every run\n")
    return root
