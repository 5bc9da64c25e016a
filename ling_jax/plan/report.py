"""Text rendering of a plan: analytic figures, budget, compiled figures, the search table."""

from __future__ import annotations

from ling_jax.params import ParamCounts
from ling_jax.plan.budget import Budget
from ling_jax.plan.compiled import CompiledPlan
from ling_jax.plan.search import Candidate, SearchResult
from ling_jax.plan.topology import GiB, Topology


def microbatch_text(cand: Candidate) -> str:
    return f"{cand.microbatches} microbatch{'es' if cand.microbatches > 1 else ''} of {cand.microbatch_rows} rows"


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def mesh_text(mesh: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items())


def memory_rows(cand: Candidate) -> list[tuple[str, int]]:
    s = cand.state
    rows = [
        ("parameters", s.params_bytes),
        ("optimizer state (AdamW mu + nu)", s.optimizer_bytes),
        ("gradients", s.gradient_bytes),
        (f"gradient accumulator (float32, {cand.microbatches} microbatches)", cand.accumulator_bytes),
        ("expert biases + counters", s.other_bytes),
    ]
    rows += [
        (f"activations: {k.strip()}", v) if not k.startswith(" ") else (f"  ({k.strip()})", v)
        for k, v in cand.activations.items()
    ]
    return rows


def count_text(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M" if n >= 1e6 else f"{n:,d}"


def print_model(counts: ParamCounts, flops_per_token: float, step_tokens: int, num_devices: int) -> None:
    print(
        f"parameters: total {count_text(counts.total)} (+ MTP {count_text(counts.mtp_total)}), "
        f"activated {count_text(counts.activated)} per token"
    )
    step = flops_per_token * step_tokens
    print(
        f"training FLOPs: {flops_per_token:.4g} per token; {step:.4g} per step of {step_tokens:,} tokens "
        f"({step / num_devices:.4g} per device)"
    )


def print_memory(cand: Candidate, topo: Topology) -> None:
    print(f"analytic memory per device on mesh {mesh_text(cand.mesh)}, {microbatch_text(cand)}:")
    for name, value in memory_rows(cand):
        print(f"  {name:<46} {gib(value):>14}")
    verdict = "fits" if cand.fits else "DOES NOT FIT"
    print(
        f"  {'total':<46} {gib(cand.memory_bytes):>14}  of {gib(topo.hbm_bytes_per_device)} HBM per device "
        f"({topo.chip.name}): {verdict}"
    )


def print_budget(b: Budget, lr: float, batch: int, seq_len: int) -> None:
    print(f"scaling laws at C = {b.flops_per_token:.4g} FLOPs/token x {b.tokens:.4g} tokens = {b.compute_flops:.4g}:")
    print(f"  efficiency leverage EL(A={b.activation_ratio:.4g}, G={b.granularity:g}) = {b.efficiency_leverage:.2f}")
    print(
        f"  optimal peak LR {b.optimal_learning_rate:.4g} (config {lr:.4g}); optimal batch "
        f"{b.optimal_batch_sequences:,} x {seq_len} tokens (config {batch:,})"
    )


def print_consumers(cand: Candidate, top: int) -> None:
    """The biggest memory terms and the largest state tensors per device."""
    rows = sorted((r for r in memory_rows(cand) if not r[0].startswith("  ")), key=lambda r: -r[1])
    print("biggest consumers per device:")
    for name, value in rows[:4]:
        print(f"  {name:<46} {gib(value):>14}")
    print("largest parameter / optimizer tensors per device:")
    for leaf in cand.state.largest(top):
        print(f"  {leaf.path:<60} {gib(leaf.bytes_per_device):>12}  {leaf.shape} as {leaf.spec}")


def print_compiled(plan: CompiledPlan, num_devices: int, hbm: int, analytic_flops_per_device: float) -> None:
    print(
        f"compiled train step on mesh {mesh_text(plan.mesh_shape)}, {plan.microbatches} microbatches: "
        f"lowered in {plan.lower_seconds:.1f} s, "
        f"compiled in {plan.compile_seconds:.1f} s"
    )
    if plan.error:
        need = f" (the compiler needs {gib(plan.required_bytes)})" if plan.required_bytes else ""
        print(f"  DOES NOT FIT: {plan.error}{need}")
        return
    m = plan.memory
    for name in ("argument", "output", "temp", "generated_code", "alias"):
        print(f"  {name + ' bytes':<33} {gib(getattr(m, name)):>14}")
    verdict = "fits" if m.total <= hbm else "DOES NOT FIT"
    print(f"  {'total (arg+out-alias+temp+code)':<33} {gib(m.total):>14}  of {gib(hbm)} per device: {verdict}")
    program = plan.program.total / num_devices
    print(
        f"  matmul FLOPs per device in the program (jaxpr, scans x length): {program:.4g} = "
        f"{program / analytic_flops_per_device:.3f} x the analytic model FLOPs (remat recompute and dense "
        f"dispatch count here)"
    )
    if plan.xla_flops_per_device:
        once = plan.program.loops_once / num_devices
        print(
            f"  XLA cost_analysis FLOPs per device (each loop body counted once): {plan.xla_flops_per_device:.4g} "
            f"= {plan.xla_flops_per_device / once:.3f} x the program's matmul FLOPs with loops once "
            f"({once:.4g})"
        )


def print_search(ranked: list[Candidate], comm: list[float], compiled: dict, shown: int) -> None:
    print(f"mesh search: {len(ranked)} valid meshes; best {min(shown, len(ranked))} by the analytic plan:")
    print(f"  {'mesh':<46} {'microbatches':>12} {'memory/device':>14} {'comm/device':>13}  analytic  compiled")
    for cand, c in list(zip(ranked, comm))[:shown]:
        key = mesh_text(cand.mesh)
        result = compiled.get(key)
        ctext = "-" if result is None else result
        print(
            f"  {key:<46} {cand.microbatches:>12} {gib(cand.memory_bytes):>14} {gib(c):>13}  "
            f"{'fits' if cand.fits else 'no':<8}  {ctext}"
        )


def print_why_none_fits(result: SearchResult, compiled: dict) -> None:
    """Every candidate mesh and why it cannot run: refused outright, over the HBM by X GiB (analytic,
    at its least-memory microbatch count), or out of memory when compiled."""
    print(f"no mesh fits; why, per candidate ({len(result.ranked) + len(result.rejected)}):")
    for cand in result.ranked:
        key = mesh_text(cand.mesh)
        if key in compiled:
            why = f"compiled: {compiled[key]}"
        elif cand.fits:
            why = f"fits analytically ({gib(cand.memory_bytes)} of {gib(cand.hbm_bytes)}), not compiled"
        else:
            over = gib(cand.memory_bytes - cand.hbm_bytes)
            why = f"memory over by {over} ({gib(cand.memory_bytes)} of {gib(cand.hbm_bytes)})"
        print(f"  {key:<46} microbatches={cand.microbatches}: {why}")
    for r in result.rejected:
        k = f" microbatches={r.microbatches}" if r.microbatches else ""
        print(f"  {mesh_text(r.mesh):<46}{k}: {r.reason}")
