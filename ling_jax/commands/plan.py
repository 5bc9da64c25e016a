"""`ling-jax plan --config configs/ling_1t.py --topology v5p:8x8x16 [--search]`: will the train
step fit, and what will it cost?

1. Analytic (no libtpu): parameter counts, training FLOPs, per-device bytes of parameters,
   optimizer state and gradients from the rules table, a first-order activation estimate, and the
   scaling-law view of the budget (EL, optimal LR and batch for --tokens).
2. Compiled (libtpu, no TPU): the real train step lowered and compiled for the topology;
   memory_analysis per device against the chip's HBM, FLOPs against the analytic count.
3. --search: meshes x microbatch counts (gradient accumulation, `train.microbatches`) ranked
   analytically, each mesh with the fewest microbatches that fit; then compiled in rank order until
   one fits (at most --search_compile compiles; a mesh over the HBM is retried once with the
   microbatch count predicted from its compiled size). When nothing fits, every candidate is listed with why
   (a mesh axis that does not divide, or the memory it is over by).

Exit status 1 when the step does not fit (the compiled verdict when there is one, else the
analytic one), with the biggest consumers named. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import flags

from ling_jax.commands.flags import define_config_flag

_CONFIG = define_config_flag()
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x2", "TPU slice, GENERATION:AxBxC (v4, v5e, v5p, v6e, tpu7x)")
_TOKENS = flags.DEFINE_float("tokens", 20e12, "planned training tokens, for the scaling-law budget C = M x tokens")
_COMPILE = flags.DEFINE_bool("compile", True, "compile the train step ahead of time (needs libtpu)")
_SEARCH = flags.DEFINE_bool(
    "search", False, "rank every mesh of the topology's devices, each with the fewest microbatches that fit"
)
_SEARCH_COMPILE = flags.DEFINE_integer(
    "search_compile", 3, "with --search: compile the best meshes in rank order until one fits, at most this many times"
)
_SEARCH_SHOW = flags.DEFINE_integer("search_show", 10, "with --search: rows of the ranking to print")
_TOP = flags.DEFINE_integer("top", 5, "largest state tensors to name when the step does not fit")


def compiled_summary(plan, hbm: int) -> dict:
    out = {
        "mesh": plan.mesh_shape,
        "microbatches": plan.microbatches,
        "lower_seconds": round(plan.lower_seconds, 2),
        "compile_seconds": round(plan.compile_seconds, 2),
        "program_flops": plan.program.total,
        "program_flops_loops_once": plan.program.loops_once,
        "xla_flops_per_device": plan.xla_flops_per_device,
        "error": plan.error,
        "required_bytes": plan.required_bytes,
    }
    if plan.memory is not None:
        out.update({f"{k}_bytes": v for k, v in dataclasses.asdict(plan.memory).items()})
        out["total_bytes"] = plan.memory.total
    out["fits"] = plan.memory is not None and plan.memory.total <= hbm
    return out


def _search(exp, layout, topo, devices, result) -> tuple[bool, object]:
    """Ranks meshes x microbatch counts and, when `devices` is given, compiles in rank order until one
    fits (at most --search_compile compiles; a mesh that compiles over the HBM is retried once with
    the microbatch count `calibrated_microbatches` predicts to fit); returns (fits, best candidate).
    When none fits, prints why per candidate."""
    from ling_jax.plan import report
    from ling_jax.plan.compiled import compile_train_step, with_microbatches
    from ling_jax.plan.search import calibrated_microbatches, communication_bytes, search_meshes

    hbm = topo.hbm_bytes_per_device
    searched = search_meshes(exp, layout, topo.num_devices, hbm)
    ranked = searched.ranked
    verdicts, compiled_fit, summaries = {}, [], {}
    budget = _SEARCH_COMPILE.value if devices is not None else 0
    for ranked_cand in ranked:
        cand = ranked_cand
        while cand is not None and budget > 0 and not compiled_fit:
            key = report.mesh_text(cand.mesh)
            summary = compiled_summary(
                compile_train_step(with_microbatches(exp, cand.microbatches), cand.mesh, devices), hbm
            )
            budget -= 1
            used = summary.get("total_bytes") or summary["required_bytes"] or 0
            verdicts[key] = f"{'fits' if summary['fits'] else 'NO'}, {report.gib(used)} at {cand.microbatches}"
            summaries[key] = summary
            print(
                f"compiled {key} with {cand.microbatches} microbatches in {summary['compile_seconds']:.1f} s: "
                f"{report.gib(used)} per chip, {'fits' if summary['fits'] else 'does NOT fit'}"
            )
            if summary["fits"]:
                compiled_fit.append(cand)
            elif used and cand is ranked_cand:  # retried once, with the microbatches predicted to fit
                cand = calibrated_microbatches(exp, cand, used)
                if cand is not None:
                    print(f"  {key}: {cand.microbatches} microbatches are predicted to fit; compiling that next")
                continue
            cand = None
        if compiled_fit or budget == 0:
            break
    if compiled_fit:  # the fitting candidate (perhaps with more microbatches) heads the ranking
        ranked = compiled_fit + [c for c in ranked if c.mesh != compiled_fit[0].mesh]
    comm = [communication_bytes(exp, c) for c in ranked]
    report.print_search(ranked, comm, verdicts, _SEARCH_SHOW.value)
    result["search"] = [
        {
            "mesh": c.mesh,
            "microbatches": c.microbatches,
            "analytic_bytes": c.memory_bytes,
            "analytic_fits": c.fits,
            "comm_bytes": cm,
            "compiled": verdicts.get(report.mesh_text(c.mesh)),
        }
        for c, cm in list(zip(ranked, comm))[: _SEARCH_SHOW.value]
    ]
    result["search_rejected"] = len(searched.rejected)
    fitting = compiled_fit if verdicts else searched.fitting
    best = fitting[0] if fitting else None
    result["best_mesh"] = best.mesh if best else None
    result["best_microbatches"] = best.microbatches if best else None
    if best is not None:
        key = report.mesh_text(best.mesh)
        where = (
            f"compiled {report.gib(summaries[key]['total_bytes'])} per chip"
            if key in summaries
            else f"analytic {report.gib(best.memory_bytes)} per chip (not compiled)"
        )
        result["best_compiled"] = summaries.get(key)
        print(
            f"best mesh: {key}, {best.microbatches} microbatches of {best.microbatch_rows} x {exp.train.seq_len}; "
            f"{where} of {report.gib(hbm)}"
        )
    else:
        report.print_why_none_fits(searched, verdicts)
        print("best mesh: none fits")
    return bool(fitting), (fitting or ranked or [None])[0]


def _fail(message: str) -> None:
    """One line on stderr and exit status 2: the command line cannot be planned."""
    print(f"ling-jax plan: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    from ling_jax.config import ConfigError
    from ling_jax.ops.pallas_target import Target
    from ling_jax.params import count_params
    from ling_jax.plan import report
    from ling_jax.plan.activations import activation_bytes
    from ling_jax.plan.analytic import state_layout
    from ling_jax.plan.budget import plan_budget
    from ling_jax.plan.compiled import compile_train_step, resolve_dispatch
    from ling_jax.plan.search import evaluate_mesh
    from ling_jax.plan.topology import TopologyError, libtpu_missing_reason, parse_topology, topology_devices
    from ling_jax.sharding.mesh import resolve_mesh_shape
    from ling_jax.train.config import experiment_from_config
    from ling_jax.train.flops import model_flops_per_token

    try:
        topo = parse_topology(_TOPOLOGY.value)
    except TopologyError as e:
        _fail(f"--topology: {e}")
    configured = experiment_from_config(_CONFIG.value)
    try:  # the routed-expert implementation a TPU run chooses (the MoE layer's selector)
        exp = resolve_dispatch(configured, Target("tpu", f"TPU {topo.chip.name}"))
    except RuntimeError as e:
        _fail(f"config error: {e}")
    n, hbm = topo.num_devices, topo.hbm_bytes_per_device
    step_tokens = exp.train.batch_size * exp.train.seq_len
    counts = count_params(exp.model)
    flops_per_token = model_flops_per_token(exp.model, exp.train.seq_len)
    print(
        f"plan: {exp.model.num_layers} layers, hidden {exp.model.hidden_size}, batch {exp.train.batch_size} x "
        f"{exp.train.seq_len}, remat {exp.model.remat_policy}, dispatch {exp.model.moe_dispatch}"
        f"{' (auto on TPU)' if configured.model.moe_dispatch == 'auto' else ''} on {topo.name} "
        f"({topo.num_chips} chips, {n} devices, {report.gib(hbm)} HBM per device)"
    )
    report.print_model(counts, flops_per_token, step_tokens, n)
    if exp.model.moe_dispatch == "dense" and exp.model.num_experts > exp.model.num_experts_per_tok:
        print(
            f"note: moe_dispatch='dense' runs all {exp.model.num_experts} experts on every token "
            f"({exp.model.num_experts / exp.model.num_experts_per_tok:g}x the routed-expert FLOPs and [N, E, F] "
            "buffers)"
        )
    budget = plan_budget(exp.model, exp.train.seq_len, _TOKENS.value)
    report.print_budget(budget, exp.train.learning_rate, exp.train.batch_size, exp.train.seq_len)
    result = {
        "topology": topo.name,
        "devices": n,
        "hbm_bytes_per_device": hbm,
        "params_total": counts.total,
        "params_activated": counts.activated,
        "params_mtp": counts.mtp_total,
        "flops_per_token": flops_per_token,
        "model_flops_per_step": flops_per_token * step_tokens,
        "budget": dataclasses.asdict(budget),
    }

    layout = state_layout(exp)
    chosen = None
    try:
        mesh = resolve_mesh_shape(exp.mesh.axes, n)
        chosen = evaluate_mesh(exp, layout, mesh, hbm)
    except ConfigError as e:
        if not _SEARCH.value:
            _fail(f"config error: {e} (--search finds a mesh and microbatch count for {topo.name})")
        print(f"the configured mesh cannot run on {topo.name}: {e}")
    if chosen is not None:
        report.print_memory(chosen, topo)
        s = chosen.state
        result["mesh"] = chosen.mesh
        result["analytic"] = {
            "params_bytes": s.params_bytes,
            "optimizer_bytes": s.optimizer_bytes,
            "gradient_bytes": s.gradient_bytes,
            "other_bytes": s.other_bytes,
            "activation_bytes": activation_bytes(chosen.activations),
            "total_bytes": chosen.memory_bytes,
            "fits": chosen.fits,
        }

    missing = libtpu_missing_reason() if _COMPILE.value else None
    status = "libtpu missing" if missing else "skipped"
    devices = None
    if _COMPILE.value and not missing:
        try:
            devices = topology_devices(topo)
        except RuntimeError as e:  # e.g. a libtpu that does not know this topology
            missing = f"libtpu could not describe {topo.name}: {str(e).strip().splitlines()[0]}"
            status = "topology unavailable"
    if missing:
        print(f"compiled part skipped: {missing}; the verdict below is analytic")
    result["compiled_status"] = status if devices is None else "ok"

    if _SEARCH.value:
        fits, shown = _search(exp, layout, topo, devices, result)
    elif devices is not None:
        plan = compile_train_step(exp, chosen.mesh, devices)
        report.print_compiled(plan, n, hbm, flops_per_token * step_tokens / n)
        result["compiled"] = compiled_summary(plan, hbm)
        result["compiled_status"] = "resource exhausted" if plan.error else "ok"
        needed = plan.required_bytes or (plan.memory.total if plan.memory else 0)
        if needed > 2 * chosen.memory_bytes:
            print(
                f"note: the compiler needs {needed / chosen.memory_bytes:.1f}x the analytic estimate: some tensor "
                "the plan assumes split over the batch is replicated (e.g. a sort or gather over all tokens)"
            )
        fits, shown = result["compiled"]["fits"], chosen
    else:
        fits, shown = chosen.fits, chosen

    result["fits"] = fits
    if not fits:
        where = f" on mesh {report.mesh_text(shown.mesh)}" if shown is not None else ""
        print(f"the train step does NOT fit{where}")
        if shown is not None:
            report.print_consumers(shown, _TOP.value)
    print(json.dumps(result))
    if not fits:
        sys.exit(1)
