"""FP8 vs float32 convergence on the tiny preset: same seed, same data, same steps.

    python benchmarks/fp8_convergence.py [--steps 300] [--seeds 0 1] [--workdir /tmp/fp8_convergence]

Trains twice with the real training loop (ling_jax.train.loop.run): once with every linear layer
except the router in blockwise FP8 (`model.fp8=xla`, the XLA reference path that runs on CPU),
once in float32, and reports the relative gap of the final losses (mean of the last 10 logged
steps, to average out batch noise) and of the held-out losses. With several --seeds (init and data
order) it reports each seed's pair and the mean gap, since one pair's gap moves with the seed. Ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from ling_jax.platform import configure_platform

configure_platform()

from common import claim_workdir  # noqa: E402

from ling_jax.train.config import experiment_from_config  # noqa: E402
from ling_jax.train.loop import run  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train(mode: str, steps: int, workdir: Path, seed: int):
    config = _tiny_config()
    config.model.fp8 = mode
    config.train.seed = seed
    config.train.steps = steps
    config.train.log_every = 1
    config.train.sample_tokens = 0
    config.checkpoint.every = 0
    shutil.rmtree(workdir, ignore_errors=True)
    result = run(experiment_from_config(config), workdir, progress=False)
    tail = [r["loss"] for r in result.records[-10:]]
    return sum(tail) / len(tail), result.heldout_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fp8_convergence"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    claim_workdir(args.workdir)  # each run's folder below is removed before it runs: never a user's
    rows = []
    for seed in args.seeds:
        f32_loss, f32_heldout = train("off", args.steps, args.workdir / f"float32_seed{seed}", seed)
        fp8_loss, fp8_heldout = train("xla", args.steps, args.workdir / f"fp8_seed{seed}", seed)
        row = {
            "seed": seed,
            "float32_loss": f32_loss,
            "fp8_loss": fp8_loss,
            "relative_gap": (fp8_loss - f32_loss) / f32_loss,
            "float32_heldout": f32_heldout,
            "fp8_heldout": fp8_heldout,
            "heldout_relative_gap": (fp8_heldout - f32_heldout) / f32_heldout,
        }
        rows.append(row)
        print(
            f"seed {seed}, steps {args.steps}: float32 final loss {f32_loss:.5f}, fp8 {fp8_loss:.5f}, relative gap "
            f"{row['relative_gap']:+.4%}; held-out float32 {f32_heldout:.5f}, fp8 {fp8_heldout:.5f}, relative gap "
            f"{row['heldout_relative_gap']:+.4%}",
            flush=True,
        )
    mean_gap = sum(r["relative_gap"] for r in rows) / len(rows)
    mean_heldout_gap = sum(r["heldout_relative_gap"] for r in rows) / len(rows)
    print(f"mean over {len(rows)} seed(s): relative gap {mean_gap:+.4%}, held-out {mean_heldout_gap:+.4%}")
    print(
        json.dumps(
            {
                "steps": args.steps,
                "seeds": rows,
                "mean_relative_gap": mean_gap,
                "mean_heldout_relative_gap": mean_heldout_gap,
            }
        )
    )


if __name__ == "__main__":
    main()
