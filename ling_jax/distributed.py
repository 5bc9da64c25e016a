"""Multi-process (multi-host) start-up: `jax.distributed.initialize`, the runtime TPU pods and GPU
clusters use. On CPU hosts the collectives go through gloo, and each process can emulate several
devices, so a multi-process run can be tested on one machine.

Where the job comes from:
- explicit: --coordinator_address / --num_processes / --process_id, or JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID;
- else JAX's own cluster detection (`jax._src.clusters.ClusterEnv`, what `jax.distributed.initialize()`
  without arguments consults): a multi-host Cloud TPU slice, SLURM (srun), Open MPI (mpirun), ...;
  a detected job of more than one process is joined with the coordinator, process count and id that
  detection reports;
- else one process, nothing to initialise.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax


class DetectedJob(NamedTuple):
    """A multi-process job found by JAX's cluster detection."""

    cluster: str  # the ClusterEnv class, e.g. "SlurmCluster", "OmpiCluster", "GceTpuCluster"
    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: list[int] | None


def detect_cluster() -> DetectedJob | None:
    """The multi-process job JAX's cluster detection finds in this environment, or None (no known
    cluster, or a job of one process). Detection methods JAX runs only on request (mpi4py) are not
    tried, as `jax.distributed.initialize()` does not try them."""
    from jax._src import clusters

    env = next((e for e in clusters.ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()), None)
    if env is None or env.get_process_count() <= 1:
        return None
    address, count, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, env.name, 300
    )
    return DetectedJob(env.__name__, address, count, pid, None if local_ids is None else list(local_ids))


def _use_gloo_on_cpu() -> None:
    if jax.config.jax_platforms in ("cpu", None) or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_devices_per_process: int = 0,
) -> DetectedJob | None:
    """Joins the job (see the module docstring for where it comes from). Arguments left None come
    from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; with none of them, from JAX's
    cluster detection. Returns the detected job when detection supplied it, else None."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if cpu_devices_per_process:
        jax.config.update("jax_num_cpu_devices", cpu_devices_per_process)
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit:
        job = detect_cluster() if process_id is None else None
        if job is None:
            return None
        _use_gloo_on_cpu()
        jax.distributed.initialize(
            coordinator_address=job.coordinator_address,
            num_processes=job.num_processes,
            process_id=job.process_id,
            local_device_ids=job.local_device_ids,
        )
        return job
    if num_processes is None or process_id is None or coordinator_address is None:
        raise ValueError(
            "a multi-process run needs all of --coordinator_address, --num_processes and --process_id "
            f"(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); got {coordinator_address!r}, "
            f"{num_processes!r}, {process_id!r}"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id {process_id} must be in [0, --num_processes={num_processes})")
    _use_gloo_on_cpu()
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return None
