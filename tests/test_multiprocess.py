"""Two processes x 2 CPU devices (jax.distributed, gloo collectives) train exactly like one process
with 4 devices: same data split by process, same losses, one collective checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SMALL = [
    "--config.model.hidden_size=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.head_dim=16",
    "--config.model.intermediate_size=64",
    "--config.model.num_experts=8",
    "--config.model.n_group=2",
    "--config.model.topk_group=1",
    "--config.model.num_experts_per_tok=2",
    "--config.model.moe_intermediate_size=16",
    "--config.train.steps=3",
    "--config.train.log_every=1",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--config.train.sample_tokens=0",
    "--config.data.max_tokens=50000",
    "--config.data.heldout_fraction=0.0",
    "--config.checkpoint.every=3",
    "--config.checkpoint.async_save=false",
    "--config.train.peak_flops_per_device=1e11",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--progress=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "ling_jax.cli", "train", *SMALL, f"--workdir={workdir}", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    multi = tmp_path / "multi"
    procs = [
        _train(
            multi,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            "--cpu_devices=2",
        )
        for i in range(2)
    ]
    single = _train(tmp_path / "single", "--cpu_devices=4")
    for p in procs + [single]:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    multi_losses, single_losses = _losses(multi), _losses(tmp_path / "single")
    assert len(multi_losses) == len(single_losses) == 3
    for a, b in zip(multi_losses, single_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (multi_losses, single_losses)
    assert (multi / "checkpoints" / "3").is_dir()  # written collectively, committed once
