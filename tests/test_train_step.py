"""The compiled train step through `ling-jax train`: what a run writes, and what a non-finite loss
does (the update is skipped; after train.max_nonfinite_steps in a row the run stops with exit code 3,
its last checkpoint intact).

Runs are subprocesses on the small test model (tests/multidevice/common.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from multidevice.common import PYTHON, REPO_ROOT, finish_cli, small_experiment, start_cli, train_args

SMOKE = dict(
    train=dict(steps=6, log_every=2, eval_every=3, sample_tokens=16, sample_prompt="def "),
    checkpoint=dict(every=5, keep=3),
)
POISON = dict(
    train=dict(steps=20, log_every=1, max_nonfinite_steps=3, warmup_steps=8, sample_tokens=0),
    checkpoint=dict(every=1, keep=20),
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both runs of this file, started together (each compiles on its own core when the cores are idle):
    "smoke": plain `ling-jax train`; "poisoned": tests/multidevice/poisoned_train.py, the same with
    a NaN loss on steps 4, 5 and from 11 on (1-based)."""
    smoke, poisoned = tmp_path_factory.mktemp("smoke"), tmp_path_factory.mktemp("poisoned")
    procs = {
        "smoke": (smoke, start_cli(*train_args(smoke, **SMOKE))),
        "poisoned": (
            poisoned,
            start_cli(
                *train_args(poisoned, **POISON)[1:],
                program=[PYTHON, str(REPO_ROOT / "tests" / "multidevice" / "poisoned_train.py")],
            ),
        ),
    }
    return {name: (workdir, finish_cli(proc, check=name == "smoke")) for name, (workdir, proc) in procs.items()}


@pytest.fixture(scope="module")
def smoke_run(runs):
    return runs["smoke"]


@pytest.fixture(scope="module")
def poisoned_run(runs):
    return runs["poisoned"]


def test_cli_train_writes_metrics_per_logged_step(smoke_run):
    from ling_jax.train.metrics_log import read_metrics

    workdir, _ = smoke_run
    records = read_metrics(workdir / "metrics.jsonl")
    # Every log_every=2 steps, every eval_every=3 steps (with a held-out loss), and the last step.
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert [s["step"] for s in records if "heldout_loss" in s] == [3, 6]
    assert all(math.isfinite(s["heldout_loss"]) for s in records if "heldout_loss" in s)
    for r in records:
        for key in (
            "loss",
            "ce_loss",
            "mtp_loss",
            "grad_norm",
            "lr",
            "tokens_per_s",
            "mfu",
            "load_max_over_mean",
            "load_cv",
            "skipped_steps",
            "load_max_over_mean/layer_0",
        ):
            assert key in r, (key, sorted(r))
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["skipped_steps"] == 0
        assert r["moe_dropped"] == 0  # dropless by default
        # loss = CE + mtp_loss_weight (0.1 in tiny.py) * MTP CE
        assert r["loss"] == pytest.approx(r["ce_loss"] + 0.1 * r["mtp_loss"], rel=1e-6)
    # WSM: linear warmup from 0 over train.warmup_steps (2 here), then constant. Step s (1-based)
    # applies lr(s - 1): 1.5e-3 at step 2, the peak from step 3 on.
    assert [r["lr"] for r in records] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3], rel=1e-6)


def test_cli_train_writes_run_directory(smoke_run):
    workdir, proc = smoke_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["model"]["hidden_size"] == 32
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    png = workdir / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["5", "6"]
    # The final report and a generated sample that starts with the prompt.
    assert "final step 6: train loss" in proc.stdout and "held-out next-token loss" in proc.stdout
    sample = proc.stdout.split("--- sample ---\n", 1)[1].rstrip("\n")
    assert sample.startswith("def ") and len(sample) > len("def ")


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} read from TFRecord event files (tensorboard itself is not installed)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_has_the_logged_scalars(smoke_run):
    from ling_jax.train.metrics_log import read_metrics

    workdir, _ = smoke_run
    scalars = _tensorboard_scalars(workdir / "tensorboard")
    assert {"loss", "lr", "tokens_per_s", "load_max_over_mean", "load_cv/layer_0"} <= set(scalars)
    records = read_metrics(workdir / "metrics.jsonl")
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]


@pytest.mark.parametrize("model", [{}, {"scan_layers": False, "use_qkv_bias": True, "use_bias": True}])
def test_weight_decay_only_on_weight_matrices(model):
    """AdamW's decay mask: every projection, expert, router and embedding matrix; no norm scale or
    bias, whether the layers are scanned (norm scales [L, D]) or not, and in MTP layers too."""
    from ling_jax.params import abstract_params
    from ling_jax.train.state import _decay_mask

    params = abstract_params(small_experiment(model=model).model)
    mask = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(_decay_mask(params))}
    for path, decayed in mask.items():
        leaf = path.rsplit("[", 1)[1].strip("]'")
        assert decayed == (leaf not in ("scale", "q_bias", "k_bias", "v_bias", "o_bias")), path
    assert sum(mask.values()) >= 10 and not all(mask.values())


# --------------------------------------------------------------------------- non-finite losses
def _state(workdir: Path, step: int):
    from ling_jax.train.run_dir import load_experiment, restore

    state, _, _, _, _ = restore(workdir, load_experiment(workdir), step)
    return jax.device_get(state)


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nonfinite_steps_are_skipped(poisoned_run):
    from ling_jax.train.metrics_log import read_metrics
    from ling_jax.train.schedule import wsm_schedule

    workdir, proc = poisoned_run
    records = {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl")}
    # Step 13, the third non-finite one in a row, stops the run before it is logged.
    assert sorted(records) == list(range(1, 13)), proc.stderr[-3000:]
    assert [s for s, r in records.items() if not math.isfinite(r["loss"])] == [4, 5, 11, 12]
    assert [records[s]["skipped_steps"] for s in range(1, 11)] == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    # A skipped step changes nothing: params, Adam moments and counters, expert biases.
    s3, s4, s5, s6 = (_state(workdir, s) for s in (3, 4, 5, 6))
    for skipped in (s4, s5):
        assert _equal(skipped.params, s3.params)
        assert _equal(skipped.opt_state, s3.opt_state)
        assert _equal(skipped.expert_bias, s3.expert_bias)
    assert (int(s4.step), int(s4.nonfinite_streak), int(s4.skipped_steps)) == (4, 1, 1)
    assert (int(s5.step), int(s5.nonfinite_streak), int(s5.skipped_steps)) == (5, 2, 2)
    # The next finite step trains again and resets the streak.
    assert not _equal(s6.params, s5.params) and not _equal(s6.expert_bias, s5.expert_bias)
    assert (int(s6.nonfinite_streak), int(s6.skipped_steps)) == (0, 2)
    # The logged LR is the one the optimizer applied: its schedule does not advance on a skipped step.
    schedule = wsm_schedule(3e-3, 8)
    assert records[6]["lr"] == pytest.approx(float(schedule(3)), rel=1e-6)  # 2 of the 5 earlier steps skipped
    assert records[3]["lr"] == pytest.approx(float(schedule(2)), rel=1e-6)


def test_too_many_nonfinite_steps_stop_the_run(poisoned_run):
    workdir, proc = poisoned_run
    assert proc.returncode == 3, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr
    assert "3 consecutive steps with a non-finite loss, gradient or updated state" in proc.stderr
    assert "train.max_nonfinite_steps=3" in proc.stderr and "stopped at step 13" in proc.stderr
    # The message names the newest checkpoint, which holds finite values.
    assert f"The newest checkpoint, {workdir / 'checkpoints' / '12'}, holds finite values" in proc.stderr
    # Checkpoints up to the last step before the stop; the newest is intact, loadable and finite,
    # and holds the weights of the last good step (10): steps 11 and 12 were skipped.
    from ling_jax.train.run_dir import checkpointer_for, load_experiment

    steps = checkpointer_for(workdir, load_experiment(workdir)).all_steps()
    assert steps == list(range(1, 13))
    last, good = _state(workdir, 12), _state(workdir, 10)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((last.params, last.opt_state, last.expert_bias)))
    assert _equal(last.params, good.params) and _equal(last.expert_bias, good.expert_bias)
    assert (int(last.step), int(last.nonfinite_streak), int(last.skipped_steps)) == (12, 2, 4)
