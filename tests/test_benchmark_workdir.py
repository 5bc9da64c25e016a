"""benchmarks/common.py `claim_workdir`: a benchmark's --workdir never deletes a user's files."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_a_directory_with_a_users_file_is_refused_and_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files a benchmark did not write"):
        common.claim_workdir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / common.WORKDIR_MARK).exists()


def test_its_own_directory_is_cleared_or_kept(tmp_path):
    root = common.claim_workdir(tmp_path / "runs")  # absent: created with the marker
    (root / "old_run").mkdir()
    (root / "old_run" / "metrics.jsonl").write_text("{}")
    common.claim_workdir(root, clear=False)
    assert (root / "old_run" / "metrics.jsonl").exists()
    common.claim_workdir(root)
    assert sorted(p.name for p in root.iterdir()) == [common.WORKDIR_MARK]
    with pytest.raises(SystemExit, match="is a file"):
        common.claim_workdir(root / common.WORKDIR_MARK)
