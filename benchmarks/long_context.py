"""Context extension on CPU: passkey retrieval at 1,024 tokens after YaRN vs plain RoPE.

    python benchmarks/long_context.py [--short_len 256] [--long_len 1024] [--short_steps 3000]
        [--long_steps 100] [--samples 10] [--workdir /tmp/long_context]

1. Stage "short": the tiny preset trained with the real training loop (ling_jax.train.loop.run)
   at sequence length `short_len` with `passkey_fraction` of its rows passkey samples
   (ling_jax/tasks/passkey.py) and max_position_embeddings = short_len.
2. Two extensions to `long_len`, each started from stage short's newest checkpoint (parameters and
   expert biases, read by ling_jax/train/init_from.py against stage short's model; the optimizer
   state starts fresh) and trained `long_steps` more steps at `long_len` with the same mix:
   - "yarn":  max_position_embeddings = long_len, rope_scaling yarn with factor long_len/short_len
              over original_max_position_embeddings = short_len;
   - "plain": max_position_embeddings = long_len, plain RoPE (the same model without YaRN).
3. Passkey accuracy (teacher-forced, exact: ling_jax.tasks.passkey.accuracy, the function behind
   `ling-jax eval --task passkey`) at each depth: stage short at short_len (did it learn the task),
   both extended configs at long_len before continued training (zero-shot) and after.

Prints a table and ends with one JSON line. Sizes are flags so a reduced run fits a busy machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from ling_jax.platform import configure_platform

configure_platform()

from common import claim_workdir  # noqa: E402

from ling_jax.data.tokenizer import load_tokenizer  # noqa: E402
from ling_jax.tasks import passkey  # noqa: E402
from ling_jax.train.config import experiment_from_config  # noqa: E402
from ling_jax.train.init_from import load_init_variables  # noqa: E402
from ling_jax.train.loop import run  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def stage_config(args, *, seq_len: int, steps: int, batch_size: int, yarn: bool | None):
    """The tiny preset for one stage. yarn None: the short stage (max positions = short_len)."""
    config = _tiny_config()
    config.data.passkey_fraction = args.passkey_fraction
    config.data.max_tokens = args.max_tokens
    config.train.update(
        seq_len=seq_len,
        steps=steps,
        batch_size=batch_size,
        seed=args.seed,
        learning_rate=args.learning_rate,
        warmup_steps=min(args.warmup_steps, steps),
        sample_tokens=0,
        log_every=max(1, steps // 10),
        eval_batches=2,
    )
    config.checkpoint.update(every=0, keep=1, async_save=False)
    if yarn is None:
        config.model.max_position_embeddings = args.short_len
    else:
        config.model.max_position_embeddings = args.long_len
        if yarn:
            config.model.rope_scaling.factor = args.long_len / args.short_len
            config.model.rope_scaling.original_max_position_embeddings = args.short_len
    return experiment_from_config(config)


def _accuracy(name: str, exp, variables, length: int, args) -> dict[float, float]:
    tokenizer = load_tokenizer(exp.data.tokenizer)
    samples = passkey.eval_samples(tokenizer, length, args.depths, args.samples, args.eval_seed)
    accuracy = passkey.accuracy(exp.model, variables, samples, args.batch_size_eval)
    print(f"{name}: " + ", ".join(f"depth {d:.2f} {a:.2f}" for d, a in accuracy.items()), flush=True)
    return accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short_len", type=int, default=256)
    parser.add_argument("--long_len", type=int, default=1024)
    parser.add_argument("--short_steps", type=int, default=3000)
    parser.add_argument("--long_steps", type=int, default=100)
    parser.add_argument("--short_batch", type=int, default=16)
    parser.add_argument("--long_batch", type=int, default=4)
    parser.add_argument("--passkey_fraction", type=float, default=0.8)
    parser.add_argument("--max_tokens", type=int, default=2_000_000, help="corpus tokens (0: the whole corpus)")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depths", type=float, nargs="+", default=list(passkey.DEFAULT_DEPTHS))
    parser.add_argument("--samples", type=int, default=10, help="passkey samples per depth")
    parser.add_argument("--eval_seed", type=int, default=1234)
    parser.add_argument("--batch_size_eval", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/long_context")
    args = parser.parse_args()
    if args.long_len <= args.short_len:
        parser.error(f"--long_len ({args.long_len}) must exceed --short_len ({args.short_len})")

    root = claim_workdir(args.workdir)
    started = time.perf_counter()
    results: dict[str, dict[float, float]] = {}
    timings: dict[str, float] = {}

    short = stage_config(args, seq_len=args.short_len, steps=args.short_steps, batch_size=args.short_batch, yarn=None)
    t0 = time.perf_counter()
    run(short, root / "short", progress=False)
    timings["short"] = time.perf_counter() - t0
    init = load_init_variables(root / "short", short.model)
    name = f"short@{args.short_len}"
    results[name] = _accuracy(name, short, init, args.short_len, args)

    for name, yarn in (("yarn", True), ("plain", False)):
        long = stage_config(args, seq_len=args.long_len, steps=args.long_steps, batch_size=args.long_batch, yarn=yarn)
        key = f"{name} zero-shot@{args.long_len}"
        results[key] = _accuracy(key, long, init, args.long_len, args)
        t0 = time.perf_counter()
        run(long, root / name, progress=False, init_variables=init)
        timings[name] = time.perf_counter() - t0
        key = f"{name}@{args.long_len}"
        results[key] = _accuracy(key, long, load_init_variables(root / name, long.model), args.long_len, args)

    depths = list(args.depths)
    print(f"\npasskey accuracy ({args.samples} samples per depth, teacher-forced exact match)")
    print(f"{'model':<24}" + "".join(f"{d:>7.2f}" for d in depths) + f"{'mean':>7}")
    for name, acc in results.items():
        print(f"{name:<24}" + "".join(f"{acc[d]:>7.2f}" for d in depths) + f"{sum(acc.values()) / len(acc):>7.2f}")
    summary = {
        "benchmark": "long_context",
        "short_len": args.short_len,
        "long_len": args.long_len,
        "short_steps": args.short_steps,
        "long_steps": args.long_steps,
        "short_batch": args.short_batch,
        "long_batch": args.long_batch,
        "passkey_fraction": args.passkey_fraction,
        "samples": args.samples,
        "accuracy": {k: {str(d): v[d] for d in depths} for k, v in results.items()},
        "mean": {k: sum(v.values()) / len(v) for k, v in results.items()},
        "train_seconds": timings,
        "total_seconds": time.perf_counter() - started,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
