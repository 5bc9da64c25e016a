"""Process setup before JAX initialises.

`configure_platform` picks the JAX platform, so a CPU machine with the `tpu` extra (libtpu) installed
does not probe for TPUs on every start (slow, and pages of warnings).

`huge_pages_environment` / `reexec_with_huge_pages` back the process's large allocations with
transparent huge pages. XLA:CPU allocates every step's temporaries (462 MB for the bench train step
of benchmarks/train_step.py) through glibc's malloc, which maps them afresh in 4 KiB pages on each
call: 113 K page faults per step. glibc >= 2.35 advises huge pages for its mappings when started
with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (it reads the variable only at start, hence the re-exec).
The bench train step runs about 12% faster with it (benchmarks/README.md, "Huge pages").
Kernels with THP "always" already do this; with "never" the tunable would change nothing.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from collections.abc import Mapping

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set to 0 to keep the process as started (no re-exec, default 4 KiB pages for malloc).
HUGE_PAGES_SWITCH = "LING_JAX_HUGE_PAGES"


def configure_platform() -> str:
    """Sets JAX_PLATFORMS when the user has not: "tpu,cpu" where TPU devices exist, "cuda,cpu" where
    an NVIDIA GPU does, else "cpu". Returns the value in force."""
    if "JAX_PLATFORMS" in os.environ:
        return os.environ["JAX_PLATFORMS"]
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        value = "tpu,cpu"
    elif glob.glob("/dev/nvidia[0-9]*"):
        value = "cuda,cpu"
    else:
        value = "cpu"
    os.environ["JAX_PLATFORMS"] = value
    if "jax" in sys.modules:  # jax reads JAX_PLATFORMS when it is imported; tell it directly
        sys.modules["jax"].config.update("jax_platforms", value)
    return value


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None where unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_pages_environment(environ: Mapping[str, str], thp_mode: str | None, libc: tuple[str, str]) -> dict | None:
    """The environment to re-execute with so that glibc's malloc uses transparent huge pages, or None
    where nothing would change: switched off (LING_JAX_HUGE_PAGES=0), already set in GLIBC_TUNABLES,
    THP not in "madvise" mode (with "always" the kernel already does it), or not glibc >= 2.35.
    Raises ValueError when LING_JAX_HUGE_PAGES is set to anything but 0 or 1."""
    switch = environ.get(HUGE_PAGES_SWITCH, "1")
    if switch not in ("0", "1"):
        raise ValueError(f"{HUGE_PAGES_SWITCH} must be 0 (off) or 1 (on, the default), got {switch!r}")
    if switch == "0" or thp_mode != "madvise":
        return None
    name, version = libc
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return env


def reexec_with_huge_pages() -> None:
    """Re-executes this command line (same PID) with huge pages for malloc where that changes
    anything (see `huge_pages_environment`); returns without effect otherwise. Call it first thing in
    a program's entry point, before any work or threads."""
    if sys.platform != "linux":
        return
    env = huge_pages_environment(os.environ, _thp_mode(), platform.libc_ver())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def huge_pages_in_effect() -> bool:
    """Whether this process's malloc uses transparent huge pages (THP "always", or "madvise" with the
    glibc tunable set at start)."""
    mode = _thp_mode()
    return mode == "always" or (mode == "madvise" and HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""))
