"""Forward + backward time of one MoE layer per dispatch path, relative to the dense-matmul floor.

The floor is one SwiGLU MLP of width (k + shared) * F on the same N tokens, as plain 2-D matmuls
(forward + backward, grads w.r.t. x and weights): the same activated matmul FLOPs as the MoE layer,
with no routing at all. Every
path runs the real `ling_jax.layers.moe.MoE` module (router, dispatch, shared expert) with
`config.replace(moe_dispatch=...)`. Each path is timed round-robin with the floor in the same run and
its ratio is the median over rounds of (path time / floor time in the same round), which keeps the
ratio stable when other processes load the machine. The default CPU path ("cpu_kernel" where the
compiled kernel is built) and "blocked" run at `--tokens`; the slow reference paths ("dense" ~20x,
"ragged" ~100x on XLA:CPU) at `--ref-tokens` (default 1024) against a floor of that size, so that the
full run stays within minutes; `--ref-tokens 0` times them at `--tokens` too.

Skewed load: the `expert_bias` variable of expert 0 is raised (bisection) until expert 0 receives
~`--skew` times the mean load; the achieved max / mean load is measured from the layer's own counts.

    JAX_PLATFORMS=cpu python benchmarks/moe_layer.py                    # full size, ~3-5 min on 2 cores
    JAX_PLATFORMS=cpu python benchmarks/moe_layer.py --tokens 1024 --ref-tokens 256 --runs 3   # quick
    JAX_PLATFORMS=cpu taskset -c 0 python benchmarks/moe_layer.py --single-thread --paths blocked

On a machine shared with other jobs, the two-thread ratios swing (a big dense matmul suffers more
from cache and core contention than the small per-block ones); --single-thread gives steadier ones.

Besides the paired ratios, "vs_fastest_floor" gives each path's median time over the fastest floor
round of its run: the conservative figure, since a floor round slowed by the host (the floor alone has
moved between 0.63 and 0.89 s per call at the default size) flatters that round's paired ratio.

Ends with one JSON line: {"<path>": ratio, ..., "floor_s": ..., "max_over_mean": ..., "vs_fastest_floor":
{"<path>": ratio, ...}, "skewed": {the same for the skewed load}, "tokens": ..., "reference_tokens": ...}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ling_jax.platform import huge_pages_in_effect, reexec_with_huge_pages  # noqa: E402

if __name__ == "__main__":  # before anything else is imported or set: as `ling-jax train` does
    reexec_with_huge_pages()

if "--single-thread" in sys.argv:  # XLA reads its flags when jax initialises: set them before the import
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import (  # noqa: E402
    compiled,
    interleaved_times,
    matmul_peak_gflops,
    paired_ratio,
    print_json_line,
    print_table,
)
from ling_jax.config import MOE_DISPATCHES, ModelConfig  # noqa: E402
from ling_jax.layers.moe import EXPERT_BIAS, MoE  # noqa: E402
from ling_jax.ops.dispatch import default_dispatch  # noqa: E402
from ling_jax.ops.routing import route  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--topk-groups", type=int, default=4)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--shared", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    # "auto" is an alias (on CPU: cpu_kernel where built, else blocked), not a path of its own.
    p.add_argument(
        "--paths",
        default=",".join(d for d in MOE_DISPATCHES if d != "auto"),
        help="comma-separated moe_dispatch values",
    )
    p.add_argument("--runs", type=int, default=7, help="timed rounds of the default CPU path vs the floor")
    p.add_argument("--ref-runs", type=int, default=1, help="timed rounds of the other (slow) paths")
    p.add_argument(
        "--ref-tokens",
        type=int,
        default=1024,
        help="tokens for the slow reference paths (0: same as --tokens); ragged on XLA:CPU is "
        "~35x the floor, ~4 min per call at 8192 tokens on 2 cores",
    )
    p.add_argument("--skew", type=float, default=4.0, help="target load of expert 0 / mean load")
    p.add_argument("--no-skewed", action="store_true", help="skip the skewed-load measurement")
    p.add_argument(
        "--single-thread",
        action="store_true",
        help="run XLA:CPU on one thread (steadier ratios on a shared, loaded machine)",
    )
    return p.parse_args(argv)


def make_config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=4 * args.hidden,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        n_group=args.groups,
        topk_group=args.topk_groups,
        num_shared_experts=args.shared,
        moe_intermediate_size=args.expert_width,
        dtype=args.dtype,
        param_dtype=args.dtype,
    )


def fwd_bwd(module, variables, *extra_inputs):
    """(params, x, cotangent) -> grads of <module(x, *extra_inputs), cotangent> w.r.t. params and x."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, x_BTD, ct_BTD):
        out = module.apply({"params": params, **rest}, x_BTD, *extra_inputs)
        y_BTD = out[0] if isinstance(out, tuple) else out
        return jnp.sum(y_BTD.astype(jnp.float32) * ct_BTD)

    return jax.grad(loss, argnums=(0, 1))


def bias_for_skew(cfg: ModelConfig, router_DE, x_ND, target: float) -> jax.Array:
    """expert_bias [E] that makes expert 0 receive ~target x the mean load (bisection on its bias)."""
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    logits_NE = x_ND.astype(jnp.float32) @ router_DE.astype(jnp.float32)

    @jax.jit
    def load_ratio(b0):
        bias_E = jnp.zeros((E,), jnp.float32).at[0].set(b0)
        ids_Nk, _ = route(
            logits_NE,
            bias_E,
            top_k=k,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        return jnp.sum(ids_Nk == 0) / (ids_Nk.size / E)

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(load_ratio(mid)) < target else (lo, mid)
    return jnp.zeros((E,), jnp.float32).at[0].set(hi)


def floor_loss(params, x_BTD, ct_BTD):
    """<SwiGLU(x), ct> with plain 2-D matmuls. (The project's 3-D `Einsum` "BTD,DF->BTF" measured
    ~1.5x slower forward + backward on XLA:CPU, so the MLP module would flatter every path.)"""
    gate_DW, up_DW, down_WD = params
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    y_ND = (jax.nn.silu(x_ND @ gate_DW) * (x_ND @ up_DW)) @ down_WD
    return jnp.sum(y_ND.astype(jnp.float32) * ct_BTD.reshape(B * T, D))


class Problem:
    """Inputs, MoE variables (uniform and skewed expert_bias) and the floor MLP for one token count."""

    def __init__(self, cfg: ModelConfig, tokens: int, skew: float | None):
        N, D = tokens, cfg.hidden_size
        k, S, F = cfg.num_experts_per_tok, cfg.num_shared_experts, cfg.moe_intermediate_size
        key_x, key_ct, key_p, key_mlp = jax.random.split(jax.random.PRNGKey(0), 4)
        self.cfg, self.tokens = cfg, tokens
        self.x_BTD = jax.random.normal(key_x, (1, N, D), cfg.jnp_dtype)
        self.ct_BTD = jax.random.normal(key_ct, (1, N, D), jnp.float32)
        self.mask_BT = jnp.ones((1, N), bool)
        variables = nn.unbox(jax.jit(MoE(cfg).init)(key_p, self.x_BTD, self.mask_BT))
        self.loads = {"uniform": variables}
        if skew is not None:
            bias_E = bias_for_skew(cfg, variables["params"]["router"], self.x_BTD.reshape(N, D), skew)
            self.loads["skewed"] = {**variables, EXPERT_BIAS: {"bias": bias_E}}
        W = (k + S) * F  # same activated matmul FLOPs as the routed + shared experts
        kg, ku, kd = jax.random.split(key_mlp, 3)
        std = cfg.init_std
        floor_params = (
            (jax.random.normal(kg, (D, W)) * std).astype(cfg.jnp_dtype),
            (jax.random.normal(ku, (D, W)) * std).astype(cfg.jnp_dtype),
            (jax.random.normal(kd, (W, D)) * std).astype(cfg.jnp_dtype),
        )
        args = (floor_params, self.x_BTD, self.ct_BTD)
        self.floor = compiled(jax.grad(floor_loss, argnums=(0, 1)), *args), args
        self.flops = 3 * 6 * N * D * W  # forward 3 matmuls of 2*N*D*W FLOPs, backward twice that

    def _case(self, fn, variables):
        args = (variables["params"], self.x_BTD, self.ct_BTD)
        return compiled(fn, *args), args

    def max_over_mean(self, load: str) -> float:
        counts_E = jax.jit(MoE(self.cfg).apply)(self.loads[load], self.x_BTD, self.mask_BT)[1].counts_E
        return float(jnp.max(counts_E) / jnp.mean(counts_E))

    def path(self, load: str, path: str):
        variables = self.loads[load]
        return self._case(fwd_bwd(MoE(self.cfg.replace(moe_dispatch=path)), variables, self.mask_BT), variables)


def measure(problem: Problem, load: str, paths, runs: int) -> tuple[dict, dict, dict]:
    """({path: median seconds}, {path: median same-round ratio to the floor}, {path: median seconds /
    the fastest floor round}) for `paths` (and "floor" in the first). The last is the conservative
    figure: a floor round slowed by the host flatters that round's paired ratio, not this one."""
    cases = {"floor": problem.floor, **{p: problem.path(load, p) for p in paths}}
    samples = interleaved_times(cases, warmup=1 if runs > 1 else 0, runs=runs)  # compiled ahead of time
    seconds = {name: statistics.median(t) for name, t in samples.items()}
    fastest_floor = min(samples["floor"])
    return (
        seconds,
        {p: paired_ratio(samples, p, "floor") for p in paths},
        {p: round(seconds[p] / fastest_floor, 3) for p in paths},
    )


def main(argv=None):
    args = parse_args(argv)
    cfg = make_config(args)
    paths = [p for p in args.paths.split(",") if p]
    fast = default_dispatch("cpu")
    fast_paths = [p for p in paths if p in (fast, "blocked")]  # timed at --tokens; the others at --ref-tokens
    ref_paths = [p for p in paths if p not in fast_paths]
    skew = None if args.no_skewed else args.skew
    peak = matmul_peak_gflops()
    main_problem = Problem(cfg, args.tokens, skew)
    ref_tokens = args.ref_tokens or args.tokens
    ref_problem = main_problem if ref_tokens == args.tokens else Problem(cfg, ref_tokens, skew)
    print(
        f"hidden {cfg.hidden_size}, experts {cfg.num_experts} top-{cfg.num_experts_per_tok} (groups "
        f"{cfg.n_group} keep {cfg.topk_group}), width {cfg.moe_intermediate_size}, shared "
        f"{cfg.num_shared_experts}, {args.dtype}; matmul peak {peak:.0f} GFLOP/s; default CPU path {fast!r}; "
        f"{', '.join(fast_paths)} at {args.tokens} tokens ({args.runs} rounds), reference paths at {ref_tokens} tokens "
        f"({args.ref_runs} rounds)",
        flush=True,
    )

    result, rows = {}, []
    for load in main_problem.loads:
        ratios, conservative = {}, {}
        for problem, group, runs in ((main_problem, fast_paths, args.runs), (ref_problem, ref_paths, args.ref_runs)):
            if not group:
                continue
            max_over_mean = problem.max_over_mean(load)
            seconds, group_ratios, group_conservative = measure(problem, load, group, runs)
            ratios.update(group_ratios)
            conservative.update(group_conservative)
            for name, t in seconds.items():
                rows.append(
                    {
                        "load": load,
                        "tokens": problem.tokens,
                        "path": name,
                        "seconds": t,
                        "x_floor": group_ratios.get(name, 1.0),
                        "GFLOP/s": problem.flops / t / 1e9,
                        "max/mean": max_over_mean,
                    }
                )
            if problem is main_problem:
                main_stats = {"floor_s": seconds["floor"], "max_over_mean": max_over_mean}
        ratios = {p: ratios[p] for p in paths}
        main_stats["vs_fastest_floor"] = {p: conservative[p] for p in paths}
        if load == "uniform":
            result.update(ratios, **main_stats)
        else:
            result[load] = {**ratios, **main_stats}
    print_table(rows)
    result.update(
        tokens=args.tokens,
        reference_tokens=ref_tokens,
        default_cpu_path=fast,
        peak_gflops=peak,
        single_thread=args.single_thread,
        malloc_huge_pages=huge_pages_in_effect(),
    )
    print_json_line(result)


if __name__ == "__main__":
    main()
