"""Decode speed: plain greedy vs MTP self-speculative greedy (k = 1..3) at batch 1 and batch 8.

    python benchmarks/decode.py [--workdir RUN] [--steps 150] [--new-tokens 64] [--runs 3]

The model: the newest checkpoint of --workdir (e.g. runs/tiny from the README's main command), or
else the tiny preset trained here for --steps steps into a temporary directory (an equivalent run,
only shorter). Prompts: the run's sample prompt (batch 1), and that prompt followed by 0..7 extra
bytes of Python (batch 8: different lengths). Each case is compiled by a warm-up call, then timed
--runs times (median, whole `generate` calls: prefill + decode + the host copy of the results).

Reported per case: generated tokens/s, acceptance rate (accepted drafts / drafted tokens), tokens
per main-model decode forward (plain: 1). Greedy speculative output equals plain output, checked
here for every case. Ends with one JSON line: speedup_batch1 / speedup_batch8 (best k over plain),
best_k_batch1, acceptance_rate (batch 1, best k) and every case.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, print_json_line, print_table  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def train_tiny(workdir: Path, steps: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "ling_jax.cli",
        "train",
        "--config",
        str(REPO_ROOT / "configs" / "tiny.py"),
        f"--config.train.steps={steps}",
        "--config.train.sample_tokens=0",
        "--workdir",
        str(workdir),
        "--noprogress",
    ]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="a trained run (default: train the tiny preset here)")
    parser.add_argument("--steps", type=int, default=150, help="training steps when no --workdir is given")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-k", type=int, default=3)
    args = parser.parse_args()

    from ling_jax.commands.generate import load_run
    from ling_jax.data.tokenizer import load_tokenizer
    from ling_jax.decoding import generate

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp) / "tiny"
        if not args.workdir:
            train_tiny(workdir, args.steps)
        cfg, variables, tokenizer_spec, prompt = load_run(str(workdir))
    tokenizer = load_tokenizer(tokenizer_spec)
    base = tokenizer.encode(prompt) or [tokenizer.eos_id]
    extra = tokenizer.encode("import os\n")
    batches = {1: [base], 8: [base + extra[:i] for i in range(8)]}
    N = args.new_tokens

    rows, cases = [], {}
    for B, prompts in batches.items():
        plain_out = None
        for k in [0, *range(1, args.max_k + 1)]:
            kw = dict(max_new_tokens=N) if k == 0 else dict(max_new_tokens=N, speculative="mtp", draft_tokens=k)
            out = generate(cfg, variables, prompts, **kw)  # compiles
            seconds = median_time(lambda kw=kw: generate(cfg, variables, prompts, **kw), warmup=0, runs=args.runs)
            if k == 0:
                plain_out = out
            else:
                assert np.array_equal(out.tokens, plain_out.tokens), f"batch {B} k={k}: not the plain greedy tokens"
            tokens = int(out.lengths.sum())
            steps = int(out.forward_steps.sum())
            case = {
                "batch": B,
                "k": k,
                "tokens_per_s": tokens / seconds,
                "seconds": seconds,
                "acceptance_rate": float(out.accepted_drafts.sum()) / max(k * steps, 1) if k else None,
                "tokens_per_forward": (tokens - B) / max(steps, 1) if k else 1.0,
            }
            cases[f"b{B}_k{k}"] = case
            rows.append({key: (f"{v:.3f}" if isinstance(v, float) else v) for key, v in case.items()})
    print_table(rows)

    def best(B):
        plain = cases[f"b{B}_k0"]["tokens_per_s"]
        k = max(range(1, args.max_k + 1), key=lambda k: cases[f"b{B}_k{k}"]["tokens_per_s"])
        return k, cases[f"b{B}_k{k}"]["tokens_per_s"] / plain

    k1, speedup1 = best(1)
    k8, speedup8 = best(8)
    print_json_line(
        {
            "benchmark": "decode",
            "workdir": args.workdir or f"tiny preset trained {args.steps} steps",
            "new_tokens": N,
            "speedup_batch1": speedup1,
            "best_k_batch1": k1,
            "speedup_batch8": speedup8,
            "best_k_batch8": k8,
            "acceptance_rate": cases[f"b1_k{k1}"]["acceptance_rate"],
            "cases": cases,
        }
    )


if __name__ == "__main__":
    main()
