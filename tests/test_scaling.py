"""Ling scaling laws against the figures published in the Ling 2.0 report (Table 1)."""

import math

import numpy as np
import pytest

from ling_jax import scaling

PRETRAIN_TOKENS = 20e12  # 4K-context pretraining stage (report Section 3.2.1)
SEQ_LEN = 4096
VOCAB = 157184

# Table 1 architectures and the published peak LR / batch (sequences of 4K).
MODELS = {
    "Ling-mini-2.0": dict(
        arch=dict(
            num_layers=20,
            d_model=2048,
            num_heads=16,
            num_kv_heads=4,
            dense_ffn=5120,
            expert_ffn=512,
            num_dense_layers=1,
        ),
        lr=3.36e-4,
        batch=4400,
    ),
    "Ling-flash-2.0": dict(
        arch=dict(
            num_layers=32,
            d_model=4096,
            num_heads=32,
            num_kv_heads=4,
            dense_ffn=9216,
            expert_ffn=1024,
            num_dense_layers=1,
        ),
        lr=2.61e-4,
        batch=8352,
    ),
    "Ling-1T": dict(
        arch=dict(
            num_layers=80,
            d_model=8192,
            num_heads=64,
            num_kv_heads=8,
            dense_ffn=18432,
            expert_ffn=2048,
            num_dense_layers=4,
        ),
        lr=1.86e-4,
        batch=18144,
    ),
}
COMMON = dict(head_dim=128, num_experts=256, experts_per_token=8, num_shared_experts=1)


def _n_act(name):
    return scaling.moe_activated_params_non_embedding(**MODELS[name]["arch"], **COMMON)


def _recommend(name):
    arch = MODELS[name]["arch"]
    m = scaling.training_flops_per_token(
        activated_params_non_embedding=_n_act(name),
        num_layers=arch["num_layers"],
        attention_width=arch["num_heads"] * COMMON["head_dim"],
        seq_len=SEQ_LEN,
    )
    return scaling.recommend_hyperparameters(flops_per_token=m, tokens=PRETRAIN_TOKENS, seq_len=SEQ_LEN)


def test_activated_params_match_published_counts():
    # 789M non-embedding (model card), 4.8B non-embedding (model card), 51.0B activated (Table 1).
    assert _n_act("Ling-mini-2.0") == pytest.approx(0.789e9, rel=0.005)
    assert _n_act("Ling-flash-2.0") == pytest.approx(4.8e9, rel=0.02)
    embeddings = 2 * VOCAB * MODELS["Ling-1T"]["arch"]["d_model"]  # untied embedding + lm_head
    assert _n_act("Ling-1T") + embeddings == pytest.approx(51.0e9, rel=0.01)


@pytest.mark.parametrize("name", list(MODELS))
def test_learning_rate_matches_table1(name):
    # The brief asks for 10%; the C = M * D convention reproduces the LRs to 0.1%, so hold it to 1%
    # (C = 6 N D, without the attention term, is 2-6% off and fails this).
    assert _recommend(name).learning_rate == pytest.approx(MODELS[name]["lr"], rel=0.01)


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_matches_table1_in_4k_sequences(name):
    rec = _recommend(name)
    assert rec.batch_sequences == pytest.approx(MODELS[name]["batch"], rel=0.05)
    assert rec.batch_tokens == pytest.approx(rec.batch_sequences * SEQ_LEN, rel=1e-3)


def test_recommendation_is_the_two_laws_at_c_equals_m_times_d():
    rec = scaling.recommend_hyperparameters(flops_per_token=1e10, tokens=1e12, seq_len=2048)
    assert rec.compute_flops == pytest.approx(1e22)
    assert rec.learning_rate == pytest.approx(1.1576 * 1e22**-0.1529)
    assert rec.batch_tokens == pytest.approx(0.0694 * 1e22**0.3644)
    assert rec.batch_sequences == round(rec.batch_tokens / 2048)


def test_laws_move_the_right_way_with_compute():
    cs = np.logspace(18, 26, 9)
    lrs = [scaling.optimal_learning_rate(c) for c in cs]
    batches = [scaling.optimal_batch_size(c) for c in cs]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert all(a < b for a, b in zip(batches, batches[1:]))


def test_efficiency_leverage_example_is_about_seven():
    # Spec/report example: A = 3.1% (8 of 256), G = 12, C = 1e22 -> EL ~ 7. Tolerance 5%.
    assert scaling.efficiency_leverage(0.031, 12, 1e22) == pytest.approx(7.0, rel=0.05)


def test_efficiency_leverage_is_the_published_formula():
    a, g, c = 1 / 32, 8.0, 3e23
    ahat = 1.0 / (1.0 / (a + 1.0 / (1 / 0.0163 - 1 / 5.28e16)) + 1 / 5.28e16)
    exponent = 1.23 - 0.0761 * math.log10(c) + 0.0167 * math.log2(g) ** 2 - 0.117 * math.log2(g)
    assert scaling.efficiency_leverage(a, g, c) == pytest.approx(ahat**exponent, rel=1e-12)


def test_granularity_optimum_is_in_the_reported_8_to_12_range():
    g_star = scaling.optimal_granularity()
    assert 8 <= g_star <= 12
    grid = np.linspace(2, 64, 621)
    for c in (1e20, 1e22, 1e24):
        els = [scaling.efficiency_leverage(1 / 32, g, c) for g in grid]
        assert abs(grid[int(np.argmax(els))] - g_star) < 0.2


def test_ling2_granularity_is_eight():
    for spec in MODELS.values():
        arch = spec["arch"]
        assert scaling.expert_granularity(arch["d_model"], arch["expert_ffn"]) == 8.0


def test_efficiency_leverage_grows_as_activation_shrinks_and_compute_grows():
    ratios = [1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    for c in (1e20, 1e22, 1e24):
        for g in (4, 8, 12):
            els = [scaling.efficiency_leverage(a, g, c) for a in ratios]
            assert all(x < y for x, y in zip(els, els[1:])), (c, g, els)
    by_c = [scaling.efficiency_leverage(1 / 32, 8, c) for c in np.logspace(19, 25, 7)]
    assert all(x < y for x, y in zip(by_c, by_c[1:]))


def test_dense_model_has_leverage_about_one():
    for c in (1e18, 1e21, 1e25):
        for g in (1, 8, 64):
            assert scaling.efficiency_leverage(1.0, g, c) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_activation_ratio_raises(bad):
    with pytest.raises(ValueError, match="activation_ratio"):
        scaling.efficiency_leverage(bad, 8, 1e22)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf")])
def test_bad_granularity_raises(bad):
    with pytest.raises(ValueError, match="granularity"):
        scaling.efficiency_leverage(0.03, bad, 1e22)


@pytest.mark.parametrize(
    "fn", [scaling.optimal_learning_rate, scaling.optimal_batch_size, lambda c: scaling.efficiency_leverage(0.03, 8, c)]
)
@pytest.mark.parametrize("bad", [0.0, -1e20, float("nan")])
def test_bad_compute_raises(fn, bad):
    with pytest.raises(ValueError, match="compute_flops"):
        fn(bad)


def test_bad_recommendation_inputs_raise():
    with pytest.raises(ValueError, match="tokens"):
        scaling.recommend_hyperparameters(flops_per_token=1e10, tokens=0, seq_len=4096)
    with pytest.raises(ValueError, match="seq_len"):
        scaling.recommend_hyperparameters(flops_per_token=1e10, tokens=1e12, seq_len=-1)
    with pytest.raises(ValueError, match="num_dense_layers"):
        scaling.moe_activated_params_non_embedding(
            **{**MODELS["Ling-mini-2.0"]["arch"], "num_dense_layers": 21}, **COMMON
        )
