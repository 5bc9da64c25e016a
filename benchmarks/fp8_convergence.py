"""FP8 vs float32 convergence on the tiny preset: same seed, same data, same steps.

    python benchmarks/fp8_convergence.py [--steps 300] [--workdir /tmp/fp8_convergence]

Trains twice with the real training loop (ling_jax.train.loop.run): once with every linear layer
except the router in blockwise FP8 (`model.fp8=xla`, the XLA reference path that runs on CPU),
once in float32, and reports the relative gap of the final losses (mean of the last 10 logged
steps, to average out batch noise) and of the held-out losses. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from ling_jax.platform import configure_platform

configure_platform()

from ling_jax.train.config import experiment_from_config  # noqa: E402
from ling_jax.train.loop import run  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train(mode: str, steps: int, workdir: Path):
    config = _tiny_config()
    config.model.fp8 = mode
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
    args = parser.parse_args()
    f32_loss, f32_heldout = train("off", args.steps, args.workdir / "float32")
    fp8_loss, fp8_heldout = train("xla", args.steps, args.workdir / "fp8")
    gap = (fp8_loss - f32_loss) / f32_loss
    heldout_gap = (fp8_heldout - f32_heldout) / f32_heldout
    print(f"steps {args.steps}: float32 final loss {f32_loss:.5f}, fp8 {fp8_loss:.5f}, relative gap {gap:+.4%}")
    print(f"held-out: float32 {f32_heldout:.5f}, fp8 {fp8_heldout:.5f}, relative gap {heldout_gap:+.4%}")
    print(json.dumps({"steps": args.steps, "float32_loss": f32_loss, "fp8_loss": fp8_loss, "relative_gap": gap,
                      "float32_heldout": f32_heldout, "fp8_heldout": fp8_heldout,
                      "heldout_relative_gap": heldout_gap}))


if __name__ == "__main__":
    main()
