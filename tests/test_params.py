"""Parameter counts (`ling_jax.params.count_params`) against the published Ling 2.0 sizes, a
hand-written formula, and the `ling-jax params` command."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ling_jax.params import count_params
from ling_jax.train.config import experiment_from_config

REPO = Path(__file__).resolve().parents[1]

# Published totals (MTP excluded) / activated per token, and activated non-embedding where given.
PUBLISHED = {"ling_mini_2": (16e9, 1.4e9, 0.79e9), "ling_flash_2": (100e9, 6.1e9, 4.8e9), "ling_1t": (1e12, 50e9, None)}


def _model(name):
    spec = importlib.util.spec_from_file_location(f"ling_preset_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return experiment_from_config(module.get_config()).model


def _formula(cfg):
    """(total, activated, mtp_total, mtp_activated) of a config, written out from the architecture."""
    D, V, Dh = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    attn = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * Dh + cfg.num_heads * Dh * D
    attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * Dh if cfg.use_qkv_bias else 0
    attn += D if cfg.use_bias else 0
    attn += 2 * Dh if cfg.use_qk_norm else 0
    norms = 2 * D
    dense = attn + norms + 3 * D * cfg.intermediate_size
    expert = 3 * D * cfg.moe_intermediate_size
    moe_common = attn + norms + D * cfg.num_experts + 3 * D * cfg.shared_intermediate_size
    moe_total = moe_common + cfg.num_experts * expert
    moe_active = moe_common + cfg.num_experts_per_tok * expert
    embed = V * D * (1 if cfg.tie_word_embeddings else 2)
    nd, nm = cfg.num_dense_layers, cfg.num_moe_layers
    total = embed + D + nd * dense + nm * moe_total
    active = embed + D + nd * dense + nm * moe_active
    mtp_extra = 2 * D + 2 * D * D + D  # enorm, hnorm, eh_proj, final norm
    M = cfg.num_mtp_layers
    return total, active, M * (mtp_extra + moe_total), M * (mtp_extra + moe_active)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes_within_3_percent(name):
    cfg = _model(name)
    c = count_params(cfg)
    total, active, active_non_embedding = PUBLISHED[name]
    assert math.isclose(c.total, total, rel_tol=0.03), c
    assert math.isclose(c.activated, active, rel_tol=0.03), c
    if active_non_embedding:
        assert math.isclose(c.activated_non_embedding, active_non_embedding, rel_tol=0.03), c
    assert c.embedding == 2 * cfg.vocab_size * cfg.hidden_size
    # MTP is reported separately, never inside the totals.
    assert c.mtp_total > 0 and c.mtp_activated < c.mtp_total
    assert (c.total, c.activated, c.mtp_total, c.mtp_activated) == _formula(cfg)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(
            use_qkv_bias=True,
            use_bias=True,
            tie_word_embeddings=True,
            use_qk_norm=False,
            num_mtp_layers=2,
            num_shared_experts=0,
            first_k_dense_replace=0,
        ),
    ],
)
def test_counts_match_the_formula_on_small_configs(make_config, changes):
    cfg = make_config("tiny", **changes)
    c = count_params(cfg)
    assert (c.total, c.activated, c.mtp_total, c.mtp_activated) == _formula(cfg)
    assert c.embedding == cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)


def test_params_command_prints_the_counts():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "ling_jax.cli", "params", "--config", str(REPO / "configs" / "ling_1t.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    c = count_params(_model("ling_1t"))
    assert figures == {
        "total": c.total,
        "activated": c.activated,
        "total_non_embedding": c.total_non_embedding,
        "activated_non_embedding": c.activated_non_embedding,
        "mtp_total": c.mtp_total,
        "mtp_activated": c.mtp_activated,
    }
    assert math.isclose(figures["total"], 1e12, rel_tol=0.03)
    assert math.isclose(figures["activated"], 50e9, rel_tol=0.03)
    text = "\n".join(lines[:-1])
    assert "total (MTP excluded)" in text and "activated per token" in text and "MTP layers total" in text
    assert f"{c.total:,d}" in text
