"""The SFT stage: `run_sft(config, workdir, init=...)` trains on chat data with the loss on the
assistant's tokens only, then reports greedy held-out accuracy on the embedded task.

It is `ling_jax.train.loop.run` (the same jitted, sharded train step, checkpoints, verified resume,
metrics.jsonl, TensorBoard and loss curve) with the rows of ling_jax/posttrain/sft_data.py as its
data. A fresh run starts from `init` (a run directory or a Hugging Face checkpoint,
ling_jax/train/init_from.py) or from a random init; a resume continues from its own checkpoints.

The config is an experiment plus an `sft` section (ling_jax/posttrain/config.py). The experiment
is stored in WORKDIR/config.json as for `ling-jax train`; the `sft` section and the init path in
WORKDIR/sft.json, checked the same way on a resume (a change is refused, or with
`allow_config_change` recorded in config_changes.jsonl).

At the end, on the embedded task: accuracy of think-on and think-off prompts on
`sft.eval_problems` held-out problems (the same ones for every stage, accuracy.heldout_problems),
from the final checkpoint as restored and verified, printed and appended to metrics.jsonl as
`heldout_accuracy_think_on` / `heldout_accuracy_think_off` (with the mean response lengths).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import ml_collections

from ling_jax.posttrain.accuracy import heldout_problems, task_accuracy
from ling_jax.posttrain.config import TASK_SOURCE, SFTConfig, sft_config_from
from ling_jax.posttrain.sft_data import build_sft_datasets
from ling_jax.train import loop
from ling_jax.train.config import Experiment, experiment_from_config
from ling_jax.train.init_from import load_init_variables
from ling_jax.train.metrics_log import MetricsLog
from ling_jax.train.run_dir import CONFIG, CONFIG_CHANGES, RunDirError

SFT_CONFIG = "sft.json"


@dataclasses.dataclass
class SFTResult:
    run: loop.RunResult
    accuracy: dict[str, float]  # heldout_accuracy_think_on / _think_off and mean lengths; empty for JSONL data


def split_config(config: ml_collections.ConfigDict | dict) -> tuple[Experiment, SFTConfig]:
    """(the experiment, the sft section) of an SFT config; ConfigError naming a bad field."""
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    sft = sft_config_from(values.pop("sft", {}))
    return experiment_from_config(values), sft


def _sft_record(sft: SFTConfig, init: str | None) -> dict:
    return {"sft": dataclasses.asdict(sft), "init": None if init is None else str(Path(init).absolute())}


def _check_sft_resume(workdir: Path, record: dict, allow_change: bool) -> list[tuple[str, object, object]]:
    """Differences from the stored sft.json; RunDirError when they are not allowed (nothing written)."""
    stored_path = workdir / SFT_CONFIG
    if not (workdir / CONFIG).is_file() or not stored_path.is_file():
        return []
    stored = json.loads(stored_path.read_text())
    changes = [(f"sft.{k}", stored["sft"].get(k), v) for k, v in record["sft"].items() if stored["sft"].get(k) != v]
    # --init only matters to a fresh run: a resume continues from its own checkpoints.
    if changes and not allow_change:
        listed = "; ".join(f"{f}: {json.dumps(a)} -> {json.dumps(b)}" for f, a, b in changes)
        raise RunDirError(
            f"--workdir {workdir} holds an SFT run with other settings ({listed}); use another --workdir, or "
            f"pass --allow_config_change to resume with them (recorded in {CONFIG_CHANGES})"
        )
    return changes


def _write_sft_record(workdir: Path, record: dict, changes: list) -> None:
    if changes:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "allow_config_change": True,
            "changes": [{"field": f, "old": a, "new": b} for f, a, b in changes],
        }
        with open(workdir / CONFIG_CHANGES, "a") as f:
            f.write(json.dumps(entry) + "\n")
    stored_path = workdir / SFT_CONFIG
    if stored_path.is_file() and not changes:
        return  # a resume keeps the record of how the run started (its --init included)
    tmp = workdir / f".{SFT_CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, stored_path)


def run_sft(
    config,
    workdir: str | Path,
    *,
    init: str | Path | None = None,
    progress: bool = True,
    allow_config_change: bool = False,
) -> SFTResult:
    """Runs (or resumes) SFT into `workdir`; see the module docstring."""
    workdir = Path(workdir)
    exp, sft = split_config(config)
    record = _sft_record(sft, None if init is None else str(init))
    changes = _check_sft_resume(workdir, record, allow_config_change)
    data = build_sft_datasets(
        exp.data.source, exp.data.tokenizer, exp.train.seq_len, exp.train.seed, exp.data.heldout_fraction, sft
    )
    resuming = (
        (workdir / CONFIG).is_file() and (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    )
    init_variables = load_init_variables(init, exp.model) if init is not None and not resuming else None
    result = loop.run(
        exp,
        workdir,
        progress=progress,
        allow_config_change=allow_config_change,
        datasets=data,
        init_variables=init_variables,
        on_start=lambda stored: _write_sft_record(workdir, record, changes),
    )
    accuracy = {}
    if exp.data.source == TASK_SOURCE and sft.eval_problems:
        accuracy = final_accuracy(exp, sft, workdir, data.tokenizer)
        if jax.process_index() == 0:
            log = MetricsLog(workdir)
            try:
                log.write({"step": result.final_step, **accuracy})
            finally:
                log.close()
    return SFTResult(result, accuracy)


def final_accuracy(exp: Experiment, sft: SFTConfig, workdir: Path, tokenizer) -> dict[str, float]:
    """Think-on and think-off held-out accuracy of the run's newest good checkpoint."""
    variables = load_init_variables(workdir, exp.model)
    problems = heldout_problems(sft.eval_problems, sft.task_config())
    out = {}
    for think, mode in ((True, "think_on"), (False, "think_off")):
        acc = task_accuracy(
            exp.model,
            variables,
            tokenizer,
            problems,
            think=think,
            max_new_tokens=sft.eval_max_new_tokens,
            batch_size=sft.eval_batch_size,
        )
        out[f"heldout_accuracy_{mode}"] = acc.accuracy
        out[f"mean_response_length_{mode}"] = acc.mean_length
    return out
