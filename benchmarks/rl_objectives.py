"""LPO vs GRPO vs GSPO on the embedded arithmetic task: the same SFT start, the same prompts per
seed, only the objective (its clipping unit and default eps) differs.

    python benchmarks/rl_objectives.py --init SFT_WORKDIR [--size small] [--seeds 0 1 2]
        [--objectives lpo grpo gspo] [--workdir /tmp/rl_objectives]

Without --init it first trains the tiny_sft preset (`ling-jax sft`) into WORKDIR/sft. Each run is
the real RL loop (ling_jax.rl.loop.run) on the tiny_rl preset with `rl.objective` and
`train.seed` set (the seed picks the training prompts and the sampling stream). Reported per
objective, over seeds: the final greedy held-out accuracy (mean and std), its gain over the SFT
start, and reward stability, the std over the last `--last` iterations of the mean batch reward
(lower is smoother). Ends with one JSON line.

Sizes (iterations, prompts per iteration, group size, held-out problems):
  tiny  4, 8, 4, 100   — a smoke run (minutes)
  small 12, 16, 8, 500 — the default
  full  the tiny_rl preset as it is (30, 16, 8, 500)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ling_jax.platform import configure_platform

configure_platform()

from common import claim_workdir, print_json_line, print_table  # noqa: E402

from ling_jax.configs import get  # noqa: E402
from ling_jax.rl.config import rl_from_config  # noqa: E402
from ling_jax.rl.loop import run  # noqa: E402

SIZES = {
    "tiny": dict(iterations=4, prompts_per_iteration=8, group_size=4, heldout_problems=100, eval_batch_size=100),
    "small": dict(iterations=12, prompts_per_iteration=16, group_size=8, heldout_problems=500),
    "full": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", help="SFT run directory (default: train tiny_sft into WORKDIR/sft first)")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=["lpo", "grpo", "gspo"])
    parser.add_argument("--last", type=int, default=5, help="iterations of the reward-stability window")
    parser.add_argument("--workdir", default="/tmp/rl_objectives")
    args = parser.parse_args()

    workdir = claim_workdir(args.workdir, clear=False)  # keeps its cached SFT run; never a user's folder
    # Runs of one objective compile the same programs (and all runs the same sampler): a persistent
    # compilation cache lets every run after the first load them instead of compiling again.
    import jax

    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    init = args.init
    if init is None:
        init = str(workdir / "sft")
        if not (Path(init) / "checkpoints").exists():
            subprocess.run([sys.executable, "-m", "ling_jax.cli", "sft", "--workdir", init, "--noprogress"], check=True)
    rows, runs = [], {}
    for objective in args.objectives:
        for seed in args.seeds:
            config = get("tiny_rl")
            config.rl.update(SIZES[args.size])
            config.rl.objective = objective
            config.train.seed = seed
            exp, rl = rl_from_config(config)
            rl = dataclasses.replace(rl, init=init)
            out = workdir / f"{args.size}_{objective}_seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            result = run(exp, rl, out, progress=False)
            rewards = [r["reward"] for r in result.records][-args.last :]
            runs.setdefault(objective, []).append(
                dict(
                    seed=seed,
                    heldout_first=result.heldout_first,
                    heldout_last=result.heldout_last,
                    reward_std_last=statistics.pstdev(rewards),
                    response_length_last=result.records[-1]["heldout_response_length"],
                    seconds=time.perf_counter() - start,
                )
            )
            print(f"{objective} seed {seed}: {runs[objective][-1]}", flush=True)
    summary = {}
    for objective, per_seed in runs.items():
        final = [r["heldout_last"] for r in per_seed]
        gain = [r["heldout_last"] - r["heldout_first"] for r in per_seed]
        stability = [r["reward_std_last"] for r in per_seed]
        summary[objective] = dict(
            heldout_mean=statistics.mean(final),
            heldout_std=statistics.pstdev(final),
            gain_mean=statistics.mean(gain),
            reward_std_last_mean=statistics.mean(stability),
            seeds=len(per_seed),
        )
        rows.append({"objective": objective, **{k: round(v, 4) for k, v in summary[objective].items()}})
    print_table(rows)
    print_json_line({"benchmark": "rl_objectives", "size": args.size, "init": init, "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
