"""metrics.jsonl reading: records of one step merge, re-logged figures win, the loss curve draws
train steps only (an SFT run resumed after its accuracy record used to crash plotting)."""

import json

from ling_jax.train.metrics_log import plot_loss_curve, read_metrics


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_records_of_one_step_merge_and_the_later_values_win(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(
        path,
        [
            {"step": 1, "loss": 3.0, "ce_loss": 2.9},
            {"step": 2, "loss": 2.0, "ce_loss": 1.9},
            {"step": 2, "heldout_accuracy_think_on": 0.25},  # the end of a first SFT run
            {"step": 2, "loss": 2.5, "ce_loss": 2.4},  # the same step re-run after a resume
            {"step": 3, "loss": 1.0, "ce_loss": 0.9},
        ],
    )
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1] == {"step": 2, "loss": 2.5, "ce_loss": 2.4, "heldout_accuracy_think_on": 0.25}


def test_loss_curve_skips_records_without_a_loss(tmp_path):
    records = [{"step": 1, "loss": 3.0, "ce_loss": 2.9}, {"step": 2, "heldout_accuracy_think_on": 0.25}]
    out = tmp_path / "loss_curve.png"
    plot_loss_curve(tmp_path, records, out)
    assert out.stat().st_size > 0
