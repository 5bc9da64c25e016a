"""TPU generations (HBM, peak FLOP/s) and topology names like "v5p:16x16x16".

The per-chip figures are Google Cloud's published specifications (the URL beside each). A JAX
device is one chip except on TPU7x, where each chip shows up as two devices (one per TensorCore
die); `get_topology_desc(topology_name="tpu7x:2x2x1")` lists 8 devices for its 4 chips. The HBM
a device may use is therefore the chip's HBM / devices per chip.

`topology_devices` needs libtpu (the project's `tpu` extra) but no TPU: it describes the devices
of a slice for ahead-of-time compilation. `LING_JAX_NO_LIBTPU=1` makes this module behave as if
libtpu were absent (for tests of the fallback path).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os

GiB = 2**30
NO_LIBTPU_ENV = "LING_JAX_NO_LIBTPU"
# What libtpu would otherwise discover from the TPU VM's metadata server and print warnings about
# ("Failed to find host bounds ...", "unexpected worker hostname ...") on a host without TPUs: one host,
# this one. Describing a topology for an ahead-of-time compile needs no runtime discovery.
AOT_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str  # the topology prefix JAX's get_topology_desc accepts
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip, dense bf16
    devices_per_chip: int
    dims: int  # torus dimensions of a topology name (2 for "4x4", 3 for "4x4x4")
    chip_config_name: str | None  # get_topology_desc's chip_config_name ("megacore" on v4)
    source: str

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.hbm_bytes // self.devices_per_chip


CHIPS: dict[str, ChipSpec] = {
    # "HBM2 capacity and bandwidth: 32 GiB, 1200 GBps"; "Peak compute per chip: 275 teraflops (bf16)".
    # Two TensorCores per chip, used as one megacore device.
    "v4": ChipSpec("v4", 32 * GiB, 275e12, 1, 3, "megacore", "https://cloud.google.com/tpu/docs/v4"),
    # "HBM capacity per chip: 16 GB"; "Peak compute per chip (bf16): 197 TFLOPs".
    "v5e": ChipSpec("v5e", 16 * GiB, 197e12, 1, 2, None, "https://cloud.google.com/tpu/docs/v5e"),
    # "HBM2e capacity and bandwidth: 95GB, 2765 GBps"; "Peak compute per chip (bf16): 459 TFLOPs"
    # (the TPU7x page lists v5p as 95 GiB per chip).
    "v5p": ChipSpec("v5p", 95 * GiB, 459e12, 1, 3, None, "https://cloud.google.com/tpu/docs/v5p"),
    # "HBM capacity per chip: 32 GB"; "Peak compute per chip (bf16): 918 TFLOPs".
    "v6e": ChipSpec("v6e", 32 * GiB, 918e12, 1, 2, None, "https://cloud.google.com/tpu/docs/v6e"),
    # "HBM capacity per chip (GiB): 192"; "Peak compute per chip (BF16) (TFLOPs): 2307"; two
    # TensorCores per chip, two JAX devices.
    "tpu7x": ChipSpec("tpu7x", 192 * GiB, 2307e12, 2, 3, None, "https://cloud.google.com/tpu/docs/tpu7x"),
}


class TopologyError(ValueError):
    """A topology name that cannot be planned for; the message says why."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5p:16x16x16"
    chip: ChipSpec
    shape: tuple[int, ...]  # chips along each torus dimension

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def num_devices(self) -> int:
        return self.num_chips * self.chip.devices_per_chip

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.chip.hbm_bytes_per_device


def parse_topology(name: str) -> Topology:
    """ "v5p:16x16x16" -> Topology (chip generation, chips per torus dimension)."""
    generation, sep, shape_text = name.partition(":")
    if not sep or generation not in CHIPS:
        raise TopologyError(f"topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of {sorted(CHIPS)}")
    chip = CHIPS[generation]
    try:
        shape = tuple(int(s) for s in shape_text.lower().split("x"))
    except ValueError:
        raise TopologyError(f"topology {name!r}: chip counts must be integers, got {shape_text!r}") from None
    if len(shape) != chip.dims or any(s <= 0 for s in shape):
        raise TopologyError(
            f"topology {name!r}: {generation} needs {chip.dims} positive chip counts, got {shape_text!r}"
        )
    return Topology(name, chip, shape)


def libtpu_missing_reason() -> str | None:
    """None when libtpu can be loaded for ahead-of-time compilation, else why not."""
    if os.environ.get(NO_LIBTPU_ENV, "") not in ("", "0"):
        return f"libtpu disabled by {NO_LIBTPU_ENV}={os.environ[NO_LIBTPU_ENV]}"
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed (install the project's `tpu` extra: pip install -e '.[tpu]')"
    return None


def has_local_tpu() -> bool:
    """Whether this host has TPU chips (the device files a TPU VM exposes)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_for_aot(environ=os.environ) -> dict[str, str]:
    """On a host without TPUs, sets AOT_LIBTPU_ENV's variables the user has not set, so that libtpu
    describes a topology without its start-up warnings; returns what it set. Must run before libtpu
    initialises. A TPU host keeps libtpu's own discovery."""
    if has_local_tpu():
        return {}
    added = {k: v for k, v in AOT_LIBTPU_ENV.items() if k not in environ}
    environ.update(added)
    return added


def topology_devices(topology: Topology) -> list:
    """The JAX devices of `topology` (no TPU needed; libtpu describes them). Raises RuntimeError
    naming the reason when libtpu is missing."""
    reason = libtpu_missing_reason()
    if reason:
        raise RuntimeError(reason)
    # Other processes on this host may hold libtpu's lock file; AOT compilation needs no exclusive
    # access to a TPU, so allow several libtpu users (must be set before the plugin initialises).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_libtpu_for_aot()
    from jax.experimental import topologies

    kwargs = {"chip_config_name": topology.chip.chip_config_name} if topology.chip.chip_config_name else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name, **kwargs)
    devices = list(desc.devices)
    if len(devices) != topology.num_devices:
        raise TopologyError(
            f"topology {topology.name}: libtpu describes {len(devices)} devices, expected "
            f"{topology.num_devices} ({topology.num_chips} chips x {topology.chip.devices_per_chip})"
        )
    return devices
