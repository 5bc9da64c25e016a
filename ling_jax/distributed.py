"""Multi-process (multi-host) start-up: `jax.distributed.initialize`, the runtime TPU pods and GPU
clusters use. On CPU hosts the collectives go through gloo, and each process can emulate several
devices, so a multi-process run can be tested on one machine."""

from __future__ import annotations

import os

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_devices_per_process: int = 0,
) -> None:
    """Joins the job. Arguments left None come from the usual environment variables
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or, on TPU pods / SLURM / Open MPI,
    from JAX's own cluster detection. Does nothing for a single-process run."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if cpu_devices_per_process:
        jax.config.update("jax_num_cpu_devices", cpu_devices_per_process)
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit:
        return
    if num_processes is None or process_id is None or coordinator_address is None:
        raise ValueError(
            "a multi-process run needs all of --coordinator_address, --num_processes and --process_id "
            f"(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); got {coordinator_address!r}, "
            f"{num_processes!r}, {process_id!r}"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id {process_id} must be in [0, --num_processes={num_processes})")
    if jax.config.jax_platforms in ("cpu", None) or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
