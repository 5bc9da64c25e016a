"""Picks the JAX platform before JAX initialises, so a CPU machine with the `tpu` extra (libtpu)
installed does not probe for TPUs on every start (slow, and pages of warnings)."""

from __future__ import annotations

import glob
import os
import sys


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
