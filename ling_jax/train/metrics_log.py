"""Where training metrics go: one JSON object per logged step in WORKDIR/metrics.jsonl (flushed
per line, so a killed run keeps what it logged; a write that fails leaves no partial line),
TensorBoard event files, and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class MetricsLog:
    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        with open(self.path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:  # e.g. a full disk: leave no torn line for the resumed run to read
                f.truncate(size)
                raise
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl, one per step in step order. The records of one step are merged, the
    later values winning: a step logged again (re-run after a resume) takes the new figures, and a
    record of other figures at that step (SFT's accuracy at its last step) keeps the training ones."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(path: Path, records: list[dict], out_png: Path, reference: float | None = None) -> None:
    # A Figure of its own, drawn by the Agg canvas savefig picks: no pyplot, so the caller's backend
    # (a notebook's inline one) and its open figures are left alone.
    from matplotlib.figure import Figure

    records = [r for r in records if "loss" in r]  # train steps only (not e.g. accuracy records)
    steps = np.array([r["step"] for r in records])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in records], label="train loss (CE + MTP)")
    ax.plot(steps, [r["ce_loss"] for r in records], label="next-token CE")
    held = [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]
    if held:
        ax.plot(*zip(*held), "o-", label="held-out CE")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(str(path))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
