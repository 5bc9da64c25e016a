"""The tutorial notebooks (notebooks/*.ipynb): each runs top to bottom (with LING_JAX_NOTEBOOK_FAST=1,
the short training loops), its saved outputs come from a complete run without errors and include
its plots, and the saved cells are those notebooks/build.py writes. Each notebook's wall time is
printed in the summary at the end of the pytest run (conftest.py), so CI logs show it."""

from __future__ import annotations

import copy
import os
import sys
import time

import pytest
from conftest import REPO_ROOT
from multidevice.common import FAST_COMPILE_FLAGS

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = REPO_ROOT / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import build  # noqa: E402  (notebooks/build.py: the cells of every notebook)

NAMES = list(build.NOTEBOOKS)


def test_every_notebook_is_built_and_saved():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_saved_notebook_is_complete(name):
    saved = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(saved)
    fresh = build.build(name)
    assert [c.source for c in saved.cells] == [c.source for c in fresh.cells], "rerun notebooks/build.py --execute"
    assert "colab.research.google.com/github/" in saved.cells[0].source and f"{name}.ipynb" in saved.cells[0].source
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "saved outputs of one full run"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "plots saved as PNG"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, record_property, monkeypatch):
    monkeypatch.setenv(build.FAST_ENV, "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAGS)  # the kernel compiles 2-3x faster at -O0
    nb = copy.deepcopy(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))
    start = time.perf_counter()
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    record_property("notebook_wall_s", (name, time.perf_counter() - start, os.cpu_count()))
