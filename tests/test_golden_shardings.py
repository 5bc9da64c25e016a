"""Golden shardings: configs/tiny.py compiled ahead of time for a TPU v5p:2x2x2 slice (8 chips) on
mesh data=2, fsdp=2, expert=2, model=1 (tiny's 16 experts, hidden 128 and batch 16 all split
evenly). The PartitionSpec of every state leaf (params, AdamW mu / nu, expert biases, counters),
as the compiled executable reports its input shardings, is kept in
tests/golden/tiny_v5p_2x2x2_shardings.txt, so any change to the rules table, a parameter's logical
axes or the optimizer state shows up as a diff.

Regenerate after an intended change:  LING_JAX_REGEN_GOLDEN=1 pytest tests/test_golden_shardings.py
Needs libtpu (the project's `tpu` extra); skipped without it.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

import pytest

from ling_jax.plan.analytic import state_layout
from ling_jax.plan.topology import libtpu_missing_reason, parse_topology, topology_devices
from ling_jax.sharding.rules import LOGICAL_AXIS_RULES
from ling_jax.train.config import experiment_from_config

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tiny_v5p_2x2x2_shardings.txt"
TOPOLOGY = "v5p:2x2x2"
MESH = {"data": 2, "fsdp": 2, "expert": 2, "model": 1}
REGEN_ENV = "LING_JAX_REGEN_GOLDEN"

_MISSING = libtpu_missing_reason()
if _MISSING:
    pytest.skip(f"TPU ahead-of-time compilation unavailable: {_MISSING}", allow_module_level=True)


def tiny_experiment():
    spec = importlib.util.spec_from_file_location("ling_preset_tiny_golden", REPO / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.mesh.update(**MESH)
    return experiment_from_config(config)


def render(rows) -> str:
    """rows of (path, shape, spec text) -> the golden file's text."""
    header = [
        f"# configs/tiny.py train state compiled for {TOPOLOGY}, mesh " + " ".join(f"{k}={v}" for k, v in MESH.items()),
        f"# path  shape  PartitionSpec (regenerate: {REGEN_ENV}=1 pytest tests/test_golden_shardings.py)",
    ]
    return "\n".join(header + [f"{path}  {shape}  {spec}" for path, shape, spec in rows]) + "\n"


def layout_rows(exp, rules=LOGICAL_AXIS_RULES):
    return [(path, shape, str(spec)) for path, _, shape, _, spec in state_layout(exp, rules).leaves]


@pytest.fixture(scope="module")
def compiled_rows():
    from ling_jax.plan.compiled import compile_train_step

    plan = compile_train_step(tiny_experiment(), MESH, topology_devices(parse_topology(TOPOLOGY)))
    assert plan.error is None, plan.error
    return list(plan.shardings)


def test_compiled_shardings_match_golden(compiled_rows):
    text = render(compiled_rows)
    if os.environ.get(REGEN_ENV):
        GOLDEN.write_text(text)
        pytest.skip(f"regenerated {GOLDEN}")
    expected = GOLDEN.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), "golden", "compiled"))
        pytest.fail(
            f"compiled shardings differ from {GOLDEN.name}; if intended, regenerate with "
            f"{REGEN_ENV}=1 pytest {Path(__file__).name}\n{diff}"
        )


def test_compiler_keeps_the_rules_table_shardings(compiled_rows):
    """The executable's input shardings are exactly what the rules table asks for, leaf by leaf."""
    assert compiled_rows == layout_rows(tiny_experiment())


def test_golden_covers_params_and_optimizer_state():
    lines = [line for line in GOLDEN.read_text().splitlines() if not line.startswith("#")]
    paths = [line.split("  ")[0] for line in lines]
    assert "params/moe_stack/layers/moe/gate_proj" in paths
    assert "opt_state/1/0/mu/moe_stack/layers/moe/gate_proj" in paths
    assert "opt_state/1/0/nu/embedding" in paths
    assert len(paths) == len(set(paths)) == len(layout_rows(tiny_experiment()))


def test_a_rules_change_shows_up_as_a_diff():
    """Moving the experts off the `expert` axis must change the golden text (the test can fail)."""
    rules = tuple((name, None if name == "exp" else axes) for name, axes in LOGICAL_AXIS_RULES)
    changed = render(layout_rows(tiny_experiment(), rules))
    diff = [
        line
        for line in difflib.unified_diff(GOLDEN.read_text().splitlines(), changed.splitlines(), lineterm="")
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]
    assert diff and all("gate_proj" in d or "up_proj" in d or "down_proj" in d for d in diff)
