"""`ling-jax plan` and ling_jax/plan/: analytic figures against independent computations, the CLI's
verdicts and exit codes, and (with libtpu) the ahead-of-time compile of the real train step."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ling_jax import scaling
from ling_jax.config import ConfigError
from ling_jax.ops.attention_core import causal_query_chunks
from ling_jax.plan.activations import activation_breakdown, activation_bytes
from ling_jax.plan.analytic import plan_state, state_layout
from ling_jax.plan.program_flops import program_flops, traced_jaxpr
from ling_jax.plan.search import (
    calibrated_microbatches,
    communication_bytes,
    evaluate_mesh,
    factorizations,
    fixed_bytes,
    mesh_rejection,
    per_microbatch_bytes,
    search_meshes,
    uses_flash_attention,
)
from ling_jax.plan.topology import GiB, TopologyError, libtpu_missing_reason, parse_topology
from ling_jax.sharding.mesh import MESH_AXES
from ling_jax.train.config import experiment_from_config
from ling_jax.train.flops import model_flops_per_token

REPO = Path(__file__).resolve().parents[1]
TINY_MESH = {"data": 2, "fsdp": 2, "expert": 2, "model": 1}
TINY_MESH_FLAGS = [f"--config.mesh.{k}={v}" for k, v in TINY_MESH.items()]
needs_libtpu = pytest.mark.skipif(
    libtpu_missing_reason() is not None, reason=f"TPU AOT compilation unavailable: {libtpu_missing_reason()}"
)


def preset(name: str, mesh: dict | None = None, train: dict | None = None, model: dict | None = None):
    spec = importlib.util.spec_from_file_location(f"ling_preset_{name}_plan", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.mesh.update(**(mesh or {}))
    config.train.update(**(train or {}))
    config.model.update(**(model or {}))
    return experiment_from_config(config)


def run_plan(*args, env=None, timeout=600):
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("JAX_PLATFORMS", None)  # the CLI picks the platform itself
    proc = subprocess.run(
        [sys.executable, "-m", "ling_jax.cli", "plan", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    return proc, (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None)


# --------------------------------------------------------------------------- topology
def test_parse_topology_chips_devices_and_hbm():
    v5p = parse_topology("v5p:16x16x16")
    assert (v5p.num_chips, v5p.num_devices, v5p.hbm_bytes_per_device) == (4096, 4096, 95 * GiB)
    ironwood = parse_topology("tpu7x:2x2x1")  # two devices (TensorCores) per chip, 192 GiB per chip
    assert (ironwood.num_devices, ironwood.hbm_bytes_per_device) == (8, 96 * GiB)
    assert parse_topology("v6e:16x16").num_devices == 256
    for bad in ("v5p:16x16", "v9:2x2", "v5p", "v5e:4xA", "v5p:0x2x2"):
        with pytest.raises(TopologyError):
            parse_topology(bad)


def test_libtpu_can_be_disabled_by_env(monkeypatch):
    monkeypatch.setenv("LING_JAX_NO_LIBTPU", "1")
    assert "LING_JAX_NO_LIBTPU" in libtpu_missing_reason()


# --------------------------------------------------------------------------- analytic state bytes
_SHARD_BYTES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from ling_jax.sharding import build_mesh
    from ling_jax.train.state import create_sharded_state, make_optimizer
    sys.path.insert(0, sys.argv[1])
    from test_plan import preset
    out = {}
    for mesh_text in sys.argv[2:]:
        sizes = dict(zip(("data", "fsdp", "expert", "model"), map(int, mesh_text.split(","))))
        exp = preset("tiny", sizes)
        mesh = build_mesh(exp.mesh.axes)
        state, _ = create_sharded_state(exp.model, make_optimizer(exp.train), mesh, seed=0)
        device = jax.devices()[0]
        per_group = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            group = getattr(path[0], "name", "")
            group = group if group in ("params", "opt_state", "expert_bias") else "other"
            shard = [s for s in leaf.addressable_shards if s.device == device][0]
            per_group[group] = per_group.get(group, 0) + shard.data.nbytes
        out[mesh_text] = per_group
    print(json.dumps(out))
""")


def test_state_bytes_match_real_shards_on_emulated_8_device_mesh():
    """Per-device bytes from the rules table == bytes of device 0's shards of a real sharded
    state, created on 8 emulated CPU devices (a subprocess: the device count is fixed at start)."""
    meshes = ["2,2,2,1", "1,2,2,2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARD_BYTES_SCRIPT, str(Path(__file__).parent), *meshes],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    exp = preset("tiny")
    layout = state_layout(exp)
    for mesh_text, groups in real.items():
        plan = plan_state(layout, dict(zip(("data", "fsdp", "expert", "model"), map(int, mesh_text.split(",")))))
        assert plan.params_bytes == groups["params"], mesh_text
        assert plan.optimizer_bytes == groups["opt_state"], mesh_text
        assert plan.other_bytes == groups["expert_bias"] + groups["other"], mesh_text


def test_optimizer_state_is_mu_and_nu_in_param_dtype():
    plan = plan_state(preset("tiny"), TINY_MESH)
    params = {leaf.path.removeprefix("params/"): leaf for leaf in plan.leaves if leaf.group == "params"}
    moments = [leaf for leaf in plan.leaves if leaf.group == "opt_state" and leaf.shape]
    assert sorted(leaf.path.split("/")[3] for leaf in moments) == sorted(["mu", "nu"] * len(params))
    for leaf in moments:  # optax adamw: mu_dtype None -> the param dtype; nu always the param dtype
        param = params[leaf.path.split("/", 4)[4]]
        assert (leaf.shape, leaf.dtype, leaf.spec) == (param.shape, param.dtype, param.spec)
    counters = [leaf for leaf in plan.leaves if leaf.group == "opt_state" and not leaf.shape]
    assert [leaf.dtype for leaf in counters] == ["int32", "int32"]  # adam's count and the schedule's count
    assert plan.optimizer_bytes == 2 * plan.params_bytes + 8
    assert plan.gradient_bytes == plan.params_bytes


def test_mesh_that_cannot_split_a_leaf_is_rejected_naming_it():
    expected = r"cannot split params/\S+ of shape \(1, 128, 2, 32\) as P\(None, \('fsdp', 'context'\)"
    with pytest.raises(ConfigError, match=expected):
        plan_state(preset("tiny"), {"data": 1, "fsdp": 3, "expert": 1, "model": 1})  # hidden 128 over 3


def test_activation_estimate_scales_with_tokens_per_device_and_remat():
    exp = preset("tiny")
    one = activation_breakdown(exp.model, 16, 128, {"data": 8, "fsdp": 1, "expert": 1, "model": 1})
    two = activation_breakdown(exp.model, 32, 128, {"data": 8, "fsdp": 1, "expert": 1, "model": 1})
    assert two["saved across layers"] == 2 * one["saved across layers"]
    assert two["logits (+ gradient)"] == 2 * one["logits (+ gradient)"]
    full = activation_breakdown(exp.model.replace(remat_policy="full"), 16, 128, TINY_MESH)
    none = activation_breakdown(exp.model, 16, 128, TINY_MESH)
    assert full["saved across layers"] < none["saved across layers"]
    assert activation_bytes(full) < activation_bytes(none)


def test_dispatch_buffers_are_per_shard():
    """Under a mesh every device dispatches only its own tokens (ling_jax/layers/moe.py), so every
    implementation's dispatch buffers shrink with the batch shards."""
    exp = preset("tiny")
    per_device = {"data": 8, "fsdp": 1, "expert": 1, "model": 1}
    one_device = {"data": 1, "fsdp": 1, "expert": 1, "model": 1}
    for impl in ("ragged", "blocked", "dense"):
        cfg = exp.model.replace(moe_dispatch=impl)
        split = activation_breakdown(cfg, 16, 128, per_device)["  of which MoE dispatch"]
        whole = activation_breakdown(cfg, 16, 128, one_device)["  of which MoE dispatch"]
        assert split * 8 == whole, impl


def test_expert_parallel_dispatch_buffers():
    """expert = e: e*N received rows (dropless send buffers of C = N) with E/e experts each, plus
    the all-to-all buffers; ragged / blocked rows carry min(k, E/e) expert slots."""
    exp = preset("tiny")
    cfg = exp.model.replace(moe_dispatch="ragged", dtype="float32")
    E, k, D, F = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    mesh = {"data": 1, "fsdp": 1, "expert": 8, "model": 1}
    tokens = 16 * 128 // 8
    rows, kl = 8 * tokens, min(k, E // 8)
    expected = 4 * rows * D * 4 + 2 * rows * kl * D * 4 + 3 * rows * kl * F * 4
    assert activation_breakdown(cfg, 16, 128, mesh)["  of which MoE dispatch"] == 2 * expected  # + gradients


def test_expert_parallel_dispatch_buffers_with_capacity_factor():
    """cf > 0: send buffers of C = min(N, ceil(cf*N*k/e)) rows and A = min(e*C*kl, e*ceil(cf*N*k/e))
    compacted assignments (ling_jax/ops/expert_parallel.py)."""
    exp = preset("tiny")
    cfg = exp.model.replace(moe_dispatch="ragged", dtype="float32", moe_capacity_factor=0.5)
    E, k, D, F = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    mesh = {"data": 1, "fsdp": 1, "expert": 8, "model": 1}
    tokens = 16 * 128 // 8
    C = min(tokens, math.ceil(0.5 * tokens * k / 8))
    A = min(8 * C * min(k, E // 8), 8 * math.ceil(0.5 * tokens * k / 8))
    assert C < tokens and A < 8 * C * min(k, E // 8)  # both bounds bind here
    expected = 4 * 8 * C * D * 4 + 2 * A * D * 4 + 3 * A * F * 4
    assert activation_breakdown(cfg, 16, 128, mesh)["  of which MoE dispatch"] == 2 * expected  # + gradients


def test_expert_all_to_all_bytes_follow_the_capacity_factor():
    """The search's communication estimate moves [expert, C, D] all-to-all buffers: C = n dropless,
    C = min(n, ceil(cf * n * k / e)) with a capacity factor (module docstring of ling_jax/plan/search.py)."""
    mesh = {"data": 1, "fsdp": 1, "expert": 8, "model": 1}
    exps = {cf: preset("tiny", mesh=mesh, model={"moe_capacity_factor": cf}) for cf in (0.0, 0.5)}
    comm = {cf: communication_bytes(e, evaluate_mesh(e, state_layout(e), mesh, 2**40)) for cf, e in exps.items()}
    cfg, train = exps[0.0].model, exps[0.0].train
    n = train.batch_size * train.seq_len // 8
    C = math.ceil(0.5 * n * cfg.num_experts_per_tok / 8)
    assert C < n
    moe_layers = cfg.num_moe_layers + cfg.num_mtp_layers
    dt = jnp.dtype(cfg.dtype).itemsize
    assert comm[0.0] - comm[0.5] == pytest.approx(6 * moe_layers * (n - C) * cfg.hidden_size * dt * 7)


# --------------------------------------------------------------------------- FLOPs
def test_program_flops_apply_scan_length_and_match_xla_without_loops():
    def layer(h, w):
        return jnp.tanh(h @ w), None

    def scanned(x, w):
        return jax.lax.scan(layer, x, w)[0].sum()

    x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((5, 32, 32), jnp.float32)
    counted = program_flops(traced_jaxpr(jax.grad(scanned, argnums=1), x, w))
    assert counted.total == 5 * counted.loops_once == 5 * 3 * 2 * 64 * 32 * 32  # forward + 2 backward matmuls

    def unrolled(x, w1, w2):
        return jnp.tanh(jnp.tanh(x @ w1) @ w2).sum()

    w2d = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    grad = jax.jit(jax.grad(unrolled, argnums=(1, 2)))
    xla = grad.lower(x, w2d, w2d).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    ours = program_flops(traced_jaxpr(grad, x, w2d, w2d)).total
    assert ours == 6 * 2 * 64 * 32 * 32 - 2 * 64 * 32 * 32  # no input gradient through the first matmul
    assert ours <= xla["flops"] <= 1.1 * ours  # XLA adds the elementwise work


def test_ragged_dot_counts_only_useful_flops():
    def f(x, w, sizes):
        return jax.lax.ragged_dot(x, w, sizes).sum()

    x = jax.ShapeDtypeStruct((100, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((4, 16, 32), jnp.float32)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
    counted = program_flops(traced_jaxpr(jax.grad(f, argnums=(0, 1)), x, w, sizes))
    assert counted.total == 3 * 2 * 100 * 16 * 32


def test_cpu_kernel_counts_its_gemms():
    from cpu_kernels.moe_experts import available, unavailable_reason
    from ling_jax.ops.dispatch import ExpertWeights, dispatch

    if not available():
        pytest.skip(str(unavailable_reason()))

    N, k, D, F, E = 40, 3, 16, 24, 6

    def f(x, ids, w, gate, up, down):
        return dispatch(x, ids, w, ExpertWeights(gate, up, down), impl="cpu_kernel").sum()

    args = [
        jax.ShapeDtypeStruct(s, dt)
        for s, dt in (
            ((N, D), jnp.float32),
            ((N, k), jnp.int32),
            ((N, k), jnp.float32),
            ((E, D, F), jnp.float32),
            ((E, D, F), jnp.float32),
            ((E, F, D), jnp.float32),
        )
    ]
    counted = program_flops(traced_jaxpr(jax.grad(f, argnums=(0, 2, 3, 4, 5)), *args))
    assert counted.total == N * k * 2 * D * F * (3 + 6)  # forward 3 GEMMs per row, backward 6


# --------------------------------------------------------------------------- mesh search
def test_factorizations_cover_every_ordered_product():
    found = factorizations(8)
    # the ordered ways to put 3 factors of 2 into len(MESH_AXES) axes: C(3 + n - 1, 3)
    assert all(math.prod(f) == 8 for f in found) and len(found) == len(set(found)) == math.comb(len(MESH_AXES) + 2, 3)


def _small(batch_size: int, **train):
    sys.path.insert(0, str(REPO / "tests"))
    from multidevice.common import small_experiment

    return small_experiment(train=dict(batch_size=batch_size, **train))


def _mesh(**sizes) -> dict:
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def test_planned_activations_are_those_of_one_microbatch():
    exp = _small(64)
    mesh = _mesh(data=8)
    one = evaluate_mesh(exp, state_layout(exp), mesh, 2**40, microbatches=1)
    four = evaluate_mesh(exp, state_layout(exp), mesh, 2**40, microbatches=4)
    flash = uses_flash_attention(exp)  # the plan's target is a TPU: "auto" attention is splash there
    assert four.activations == activation_breakdown(exp.model, 16, exp.train.seq_len, mesh, flash=flash)
    assert activation_bytes(four.activations) < activation_bytes(one.activations)
    # the float32 gradient accumulator: one float32 copy of the device's parameters, only when accumulating
    params = sum(leaf.bytes_per_device for leaf in four.state.leaves if leaf.group == "params")
    assert one.accumulator_bytes == 0 and four.accumulator_bytes == params  # float32 params here
    assert (
        four.memory_bytes - activation_bytes(four.activations)
        == one.memory_bytes - activation_bytes(one.activations) + params
    )
    # FSDP gathers the weights once per microbatch
    fsdp = _mesh(fsdp=8)
    comm = [
        communication_bytes(exp, evaluate_mesh(exp, state_layout(exp), fsdp, 2**40, microbatches=k)) for k in (1, 4)
    ]
    assert comm[1] > comm[0]


def test_search_takes_the_fewest_microbatches_that_fit():
    """An HBM between the memory of 2 and of 1 microbatch on data=8: the search accumulates over 2."""
    exp = _small(32)
    layout = state_layout(exp)
    data8 = _mesh(data=8)
    need = {k: evaluate_mesh(exp, layout, data8, 2**40, microbatches=k).memory_bytes for k in (1, 2, 4)}
    assert need[1] > need[2] > need[4]
    hbm = (need[1] + need[2]) // 2
    result = search_meshes(exp, layout, 8, hbm)
    by_mesh = {tuple(c.mesh.values()): c for c in result.ranked}
    assert by_mesh[tuple(data8.values())].microbatches == 2 and by_mesh[tuple(data8.values())].fits
    fits = [c.fits for c in result.ranked]
    assert fits == sorted(fits, reverse=True)
    for cand in result.ranked:
        assert math.prod(cand.mesh.values()) == 8 and mesh_rejection(exp, cand.mesh, cand.microbatches) is None
        smaller = [k for k in range(1, cand.microbatches) if mesh_rejection(exp, cand.mesh, k) is None]
        if cand.fits:  # no smaller valid microbatch count fits
            assert all(not evaluate_mesh(exp, layout, cand.mesh, hbm, microbatches=k).fits for k in smaller)
    # without the microbatch search only train.microbatches (1) is tried: data=8 does not fit then
    plain = search_meshes(exp, layout, 8, hbm, search_microbatches=False)
    assert all(c.microbatches == 1 for c in plain.ranked)
    assert not {tuple(c.mesh.values()): c for c in plain.ranked}[tuple(data8.values())].fits


def test_a_compiled_miss_is_retried_with_calibrated_microbatches():
    """A compile that needs more than planned: the per-microbatch part is scaled by the excess, and the
    fewest more microbatches predicted to fit under that scale are taken (None when none would)."""
    exp = _small(64)
    layout = state_layout(exp)
    data8 = _mesh(data=8)
    one = evaluate_mesh(exp, layout, data8, 2**40, microbatches=1)
    plans = {k: evaluate_mesh(exp, layout, data8, 2**40, microbatches=k) for k in (2, 4, 8)}
    assert fixed_bytes(one) + per_microbatch_bytes(one) == one.memory_bytes
    compiled = fixed_bytes(one) + 3 * per_microbatch_bytes(one)  # the compiler needed 3x the activations
    hbm = fixed_bytes(plans[4]) + 3 * per_microbatch_bytes(plans[4])  # 4 microbatches fit at that scale
    cand = dataclasses.replace(one, hbm_bytes=hbm)
    retry = calibrated_microbatches(exp, cand, compiled)
    assert retry is not None and retry.microbatches == 4 and retry.mesh == data8
    assert fixed_bytes(plans[2]) + 3 * per_microbatch_bytes(plans[2]) > hbm  # 2 would not
    # the fixed part alone over the HBM: no microbatch count helps
    assert calibrated_microbatches(exp, dataclasses.replace(one, hbm_bytes=fixed_bytes(plans[8]) - 1), compiled) is None


def test_search_says_why_meshes_are_refused():
    """Batch 24 = 2^3 x 3 on 16 devices: meshes with 16 batch shards cannot split it (in any number
    of microbatches); every refused mesh has its reason."""
    exp = _small(24)
    result = search_meshes(exp, state_layout(exp), 16, 2**40)
    assert result.ranked and all(c.fits and c.microbatches == 1 for c in result.ranked)  # ample memory: one pass
    reasons = {tuple(r.mesh.values()): r.reason for r in result.rejected}
    assert (
        "no microbatch count cuts batch 24 into microbatches divisible by data*fsdp*expert=16"
        in (reasons[tuple(_mesh(data=16).values())])
    )
    assert "model=4 does not divide num_kv_heads=2" in reasons[tuple(_mesh(data=4, model=4).values())]
    assert mesh_rejection(exp, _mesh(data=8), 2) == (
        "microbatches of 12 rows (batch 24 / 2) are not divisible by data*fsdp*expert=8"
    )
    assert mesh_rejection(exp, _mesh(data=8), 5) == "microbatches=5 does not divide batch 24"


# --------------------------------------------------------------------------- the command
def test_plan_cli_without_libtpu_prints_analytic_plan_and_budget():
    proc, result = run_plan(
        "--config", "configs/tiny.py", "--topology", "v5p:2x2x2", *TINY_MESH_FLAGS, env={"LING_JAX_NO_LIBTPU": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled part skipped: libtpu disabled by LING_JAX_NO_LIBTPU" in proc.stdout
    assert result["compiled_status"] == "libtpu missing" and result["fits"] is True
    exp = preset("tiny")
    layout_plan = plan_state(exp, TINY_MESH)
    assert result["analytic"]["params_bytes"] == layout_plan.params_bytes
    m = model_flops_per_token(exp.model, exp.train.seq_len)
    assert result["flops_per_token"] == m
    assert result["model_flops_per_step"] == m * exp.train.batch_size * exp.train.seq_len
    c = m * 20e12
    budget = result["budget"]
    assert budget["efficiency_leverage"] == pytest.approx(scaling.efficiency_leverage(2 / 16, 2 * 128 / 64, c))
    assert budget["optimal_learning_rate"] == pytest.approx(1.1576 * c**-0.1529)
    assert budget["optimal_batch_sequences"] == round(0.0694 * c**0.3644 / exp.train.seq_len)
    assert "efficiency leverage EL(A=0.125, G=4)" in proc.stdout
    assert "optimal peak LR" in proc.stdout and "(config 0.003)" in proc.stdout


def test_plan_cli_ling_1t_on_8_chips_fails_naming_biggest_consumers():
    one_axis = ["--config.mesh.expert=1", "--config.mesh.context=1"]  # the preset's mesh is for 1,024 chips
    proc, result = run_plan("--config", "configs/ling_1t.py", "--topology", "v5p:2x2x2", "--nocompile", *one_axis)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert result["fits"] is False and result["analytic"]["fits"] is False
    out = proc.stdout
    assert "the train step does NOT fit" in out and "biggest consumers per device:" in out
    assert "optimizer state (AdamW mu + nu)" in out.split("biggest consumers per device:")[1]
    assert "params/moe_stack/layers/moe/" in out and "opt_state/1/0/" in out
    assert result["params_total"] > 0.9e12 and result["analytic"]["params_bytes"] > 400 * GiB


def test_plan_cli_a_mesh_the_topology_cannot_hold_points_to_search():
    """The ling_1t preset's mesh needs multiples of 128 devices: on 8 chips a clear error, exit 2."""
    proc, _ = run_plan("--config", "configs/ling_1t.py", "--topology", "v5p:2x2x2", "--nocompile")
    assert proc.returncode == 2
    assert "mesh.fsdp=-1: the other axes' product 128 does not divide the 8 devices" in proc.stderr
    assert "--search finds a mesh and microbatch count for v5p:2x2x2" in proc.stderr


def test_plan_cli_search_without_libtpu_ranks_meshes():
    proc, result = run_plan(
        "--config", "configs/tiny.py", "--topology", "v5p:2x2x2", "--search", env={"LING_JAX_NO_LIBTPU": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mesh search:" in proc.stdout and result["best_mesh"]
    meshes = [row["mesh"] for row in result["search"]]
    assert all(math.prod(m.values()) == 8 for m in meshes)


@needs_libtpu
def test_plan_cli_search_compiles_a_context_mesh_for_v5p():
    """tiny's search ranks a context=2 mesh first: 64 queries per device, which the splash kernel cannot
    take, so "auto" attention runs the XLA core there (it used to pick splash from the whole 128 and
    fail while tracing)."""
    proc, result = run_plan("--config", "configs/tiny.py", "--topology", "v5p:2x2x2", "--search", "--search_compile=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert result["best_mesh"]["context"] > 1 and result["best_compiled"]["fits"]


@needs_libtpu
def test_plan_cli_tiny_compiles_for_v5p_and_fits():
    # The XLA attention core: its FLOPs are the exact accounting below (auto on TPU is the splash kernel,
    # a Pallas call the program's FLOP count does not see into).
    proc, result = run_plan(
        "--config", "configs/tiny.py", "--topology", "v5p:2x2x2", *TINY_MESH_FLAGS, "--config.model.attention_impl=xla"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = result["compiled"]
    assert result["compiled_status"] == "ok" and compiled["fits"] and result["fits"]
    assert compiled["total_bytes"] == (
        compiled["argument_bytes"]
        + compiled["output_bytes"]
        - compiled["alias_bytes"]
        + compiled["temp_bytes"]
        + compiled["generated_code_bytes"]
    )
    assert compiled["alias_bytes"] > 0  # the state is donated
    # The state arguments hold at least the analytic params + optimizer state (TPU tiles add padding).
    assert compiled["argument_bytes"] >= result["analytic"]["params_bytes"] + result["analytic"]["optimizer_bytes"]
    # Ragged dispatch (auto on TPU) and no remat: the traced program's matmuls are the model FLOPs,
    # up to 0.11% (the model's 6N counts the norm scales, the program the top-k combine einsum), plus
    # the empty slots of the expert-parallel buffers (expert=2, ling_jax/ops/expert_parallel.py):
    # each device receives C = n rows from each of the P shards with kl = min(k, E/P) expert slots, and
    # ragged_dot runs empty slots (weight 0), so per device and MoE layer P*n*kl rows run instead of
    # n*k, each costing 3 x (6DF + 2D) (forward and two backward matmuls; the combine einsum).
    exp, P = preset("tiny"), TINY_MESH["expert"]
    cfg, shards = exp.model, TINY_MESH["data"] * TINY_MESH["fsdp"] * TINY_MESH["expert"]
    n = exp.train.batch_size * exp.train.seq_len // shards  # tokens per device
    kl = min(cfg.num_experts_per_tok, cfg.num_experts // P)
    extra_rows = (P * n * kl - n * cfg.num_experts_per_tok) * shards * TINY_MESH["model"]
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    ep_padding = extra_rows * (cfg.num_moe_layers + cfg.num_mtp_layers) * 3 * (6 * D * F + 2 * D)
    # Causal query chunks (ling_jax/ops/attention_core.py) skip (n - 1) / (2n) of the attention term
    # 12 x layers x H*d x T per token that the model FLOPs count in full.
    T, chunks = exp.train.seq_len, causal_query_chunks(exp.train.seq_len)
    attention_per_step = (
        12 * (cfg.num_layers + cfg.num_mtp_layers) * cfg.num_heads * cfg.head_dim * T * exp.train.batch_size * T
    )
    attention_skipped = attention_per_step * (chunks - 1) // (2 * chunks)
    expected = result["model_flops_per_step"] + ep_padding - attention_skipped
    assert compiled["program_flops"] == pytest.approx(expected, rel=0.002)
    assert "compiled train step on mesh data=2 fsdp=2 expert=2 context=1 model=1" in proc.stdout


def _compiled_function_names(hlo_text: str) -> set[str]:
    """The Python functions the compiled HLO module's metadata names (its FunctionNames table)."""
    table = hlo_text.split("\nFunctionNames\n", 1)[1].split("\n\n", 1)[0]
    return {line.split(" ", 1)[1].strip('"') for line in table.splitlines() if " " in line}


@needs_libtpu
def test_fp8_plan_compiles_the_blocked_fp8_experts_a_tpu_run_uses():
    """`plan` on an FP8 config: the compiled TPU program holds the blocked FP8 expert scan (FP8 operands),
    not "ragged" (TPU's choice without FP8) with high-precision experts. Tiny, two layers, one MoE."""
    from ling_jax.plan.compiled import lower_train_step
    from ling_jax.plan.topology import topology_devices

    exp = preset("tiny", mesh=TINY_MESH, train={"batch_size": 8, "seq_len": 64}, model={"fp8": "xla", "num_layers": 2})
    exp = dataclasses.replace(exp, model=exp.model.replace(num_mtp_layers=0))
    lowered = lower_train_step(exp, TINY_MESH, topology_devices(parse_topology("v5p:2x2x2")))
    assert lowered.exp.model.moe_dispatch == "blocked"
    text = lowered.lowered.compile().as_text()
    functions = _compiled_function_names(text)
    assert "blocked_moe_fp8" in functions, sorted(functions)
    assert not {"dispatch_ragged", "dispatch_dense"} & functions
    assert "f8e4m3fn" in text


@pytest.mark.slow
@needs_libtpu
def test_ling_1t_compiles_for_v5p_16x16x16_and_fits():
    """The headline (benchmarks/README.md): Ling-1T's real train step on 4,096 v5p chips."""
    proc, result = run_plan(
        "--config",
        "configs/ling_1t.py",
        "--topology",
        "v5p:16x16x16",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=512",
        "--config.mesh.expert=1",
        "--config.mesh.context=1",
        "--config.mesh.model=8",
        "--config.train.batch_size=512",
        "--config.train.microbatches=1",  # one pass at batch 512, without the 4K stage's batch ramp
        "--config.train.batch_ramp.start=0",
        "--config.model.moe_dispatch=dense",
        timeout=3000,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["compiled"]["fits"]
