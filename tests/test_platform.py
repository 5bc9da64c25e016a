"""Process setup (ling_jax/platform.py): when the process restarts itself with huge pages for malloc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ling_jax.platform import HUGE_PAGES_TUNABLE, _thp_mode, huge_pages_environment

REPO = Path(__file__).resolve().parents[1]
GLIBC = ("glibc", "2.36")


def test_adds_the_tunable_where_the_kernel_advises_huge_pages():
    env = huge_pages_environment({"PATH": "/bin"}, "madvise", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}


def test_appends_to_the_user_tunables():
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"


@pytest.mark.parametrize(
    "environ, thp_mode, libc",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user's own choice stands
        ({"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}, "madvise", GLIBC),  # already restarted: no loop
        ({"LING_JAX_HUGE_PAGES": "0"}, "madvise", GLIBC),  # switched off
        ({}, "always", GLIBC),  # the kernel already backs every mapping with huge pages
        ({}, "never", GLIBC),  # the tunable could not change anything
        ({}, None, GLIBC),  # no THP interface (not Linux, or a container without /sys)
        ({}, "madvise", ("glibc", "2.34")),  # before the tunable existed
        ({}, "madvise", ("", "")),  # musl and other C libraries
    ],
)
def test_leaves_the_process_alone(environ, thp_mode, libc):
    assert huge_pages_environment(environ, thp_mode, libc) is None


@pytest.mark.parametrize("value", ["off", "", "2"])
def test_a_bad_switch_value_is_refused_by_name(value):
    with pytest.raises(ValueError, match=r"LING_JAX_HUGE_PAGES must be 0 \(off\) or 1"):
        huge_pages_environment({"LING_JAX_HUGE_PAGES": value}, "madvise", GLIBC)


def test_the_cli_names_a_bad_switch_value():
    env = {**os.environ, "LING_JAX_HUGE_PAGES": "off"}
    proc = subprocess.run(
        [sys.executable, "-m", "ling_jax.cli", "params", "--config", "configs/tiny.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "LING_JAX_HUGE_PAGES must be 0 (off) or 1 (on, the default), got 'off'" in proc.stderr


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert _thp_mode(str(path)) == "madvise"
    assert _thp_mode(str(tmp_path / "missing")) is None


def test_reexec_restarts_the_command_line_with_the_tunable():
    """A child that calls reexec_with_huge_pages() runs its code again in the same process, with the
    tunable where this host needs it (and unchanged elsewhere), and then reports huge pages in effect."""
    code = (
        "import os, sys; from ling_jax.platform import reexec_with_huge_pages, huge_pages_in_effect; "
        "print('start', os.getpid(), flush=True); reexec_with_huge_pages(); "
        "print('tunables', os.environ.get('GLIBC_TUNABLES', ''), 'in_effect', huge_pages_in_effect(), "
        "sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LING_JAX_HUGE_PAGES")}
    out = subprocess.run(
        [sys.executable, "-c", code, "arg1"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    expected = huge_pages_environment(env, _thp_mode(), platform.libc_ver()) if sys.platform == "linux" else None
    starts = [line for line in out if line.startswith("start")]
    final = [line for line in out if line.startswith("tunables")]
    assert len(final) == 1 and final[0].endswith("['arg1']")
    if expected is None:
        assert len(starts) == 1 and final[0].startswith("tunables  in_effect")
    else:
        assert len(starts) == 2 and len({s.split()[1] for s in starts}) == 1  # same PID, started twice
        assert final[0].startswith(f"tunables {HUGE_PAGES_TUNABLE} in_effect True")
