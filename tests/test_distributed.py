"""ling_jax/distributed.py: explicit flags, JAX's cluster detection (SLURM, Open MPI) and the plain
single-process machine, with `jax.distributed.initialize` replaced by a recorder."""

from __future__ import annotations

import jax
import pytest

from ling_jax import distributed

CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_PORT",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "KUBERNETES_SERVICE_HOST",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
)


# A 4-task SLURM step (srun), this process task 2 on the first node.
SLURM = {
    "SLURM_JOB_ID": "4097",
    "SLURM_STEP_NODELIST": "n1",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
}


@pytest.fixture
def calls(monkeypatch):
    """A clean environment (no cluster variables) and the recorded initialize calls."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
    # Not a cpu platform string, so the test leaves the collectives setting alone.
    monkeypatch.setattr(distributed, "_use_gloo_on_cpu", lambda: None)
    return recorded


def setenv(monkeypatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_plain_machine_stays_single_process(calls):
    assert distributed.detect_cluster() is None
    assert distributed.initialize() is None
    assert calls == []


def test_slurm_job_is_joined_with_the_detected_coordinator_count_and_rank(calls, monkeypatch):
    setenv(monkeypatch, SLURM | {"SLURM_STEP_NODELIST": "gpu[017-020],login1", "SLURM_LOCALID": "1"})
    job = distributed.initialize()
    port = 4097 % 2**12 + 65535 - 2**12 + 1  # SLURM's ephemeral port from the job id (JAX's rule)
    expected = dict(coordinator_address=f"gpu017:{port}", num_processes=4, process_id=2, local_device_ids=[1])
    assert calls == [expected]
    assert job.cluster == "SlurmCluster"


def test_open_mpi_job_is_joined(calls, monkeypatch):
    setenv(
        monkeypatch,
        {
            "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "JAX_COORDINATOR_PORT": "12345",
        },
    )
    distributed.initialize()
    assert calls == [dict(coordinator_address="10.96.0.1:12345", num_processes=8, process_id=5, local_device_ids=[1])]


def test_one_task_slurm_job_stays_single_process(calls, monkeypatch):
    setenv(monkeypatch, SLURM | {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert distributed.initialize() is None
    assert calls == []


def test_explicit_flags_win_over_detection(calls, monkeypatch):
    setenv(monkeypatch, SLURM)
    distributed.initialize("host0:1234", 2, 1)
    assert calls == [dict(coordinator_address="host0:1234", num_processes=2, process_id=1)]
    with pytest.raises(ValueError, match="needs all of --coordinator_address"):
        distributed.initialize("host0:1234")
