"""KV-cache generation (`ling_jax.generate.generate`) and next-token sampling (`ling_jax.sampling`).

The prompts and `max_new_tokens` match tests/test_model_properties.py so the compiled decode loops
are shared within one pytest run.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.decoding.generate import generate
from ling_jax.decoding.sampling import sample_logits
from ling_jax.model import LingModel

PROMPTS = [[5, 17, 3, 40, 22], [9, 31, 2]]
N_NEW = 6


@pytest.fixture(scope="module")
def greedy(gen_cfg, gen_vars):
    return generate(gen_cfg, gen_vars, PROMPTS, max_new_tokens=N_NEW, return_logits=True)


def test_greedy_equals_argmax_of_no_cache_loop(gen_cfg, gen_vars, greedy, fast_jit):
    """Each row of the (left-padded) batch equals a loop of full forwards of that prompt alone,
    taking the argmax of the last logits. One compiled [2, L] forward serves every step: the rows
    are right-padded with segment id 0, which causality keeps out of the real positions."""
    L = max(map(len, PROMPTS)) + N_NEW
    fwd = fast_jit(
        lambda v, x, s: LingModel(gen_cfg).apply(v, x, None, s, with_mtp=False).logits,
        gen_vars,
        jnp.zeros((2, L), jnp.int32),
        jnp.zeros((2, L), jnp.int32),
    )
    seqs = [list(p) for p in PROMPTS]
    assert greedy.tokens.shape == (2, N_NEW) and greedy.tokens.dtype == np.int32
    for step in range(N_NEW):
        ids, seg = np.zeros((2, L), np.int32), np.zeros((2, L), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], seg[i, : len(s)] = s, 1
        logits = np.asarray(fwd(gen_vars, ids, seg))
        for i, s in enumerate(seqs):
            last = logits[i, len(s) - 1]
            assert greedy.tokens[i, step] == np.argmax(last), f"row {i} step {step}"
            np.testing.assert_allclose(greedy.logits[i, step], last, atol=2e-5, rtol=2e-5)
            s.append(int(np.argmax(last)))
    np.testing.assert_array_equal(greedy.lengths, [N_NEW, N_NEW])


def test_logprobs_are_unfiltered_log_softmax_of_the_logits(gen_cfg, gen_vars, greedy):
    """logprobs: log softmax(raw logits)[token] at temperature 1, whatever the sampling settings (the
    RL policy log-prob); the lean default output equals the return_logits one and holds no logits."""
    expected = np.take_along_axis(jax.nn.log_softmax(greedy.logits, axis=-1), greedy.tokens[..., None], axis=-1)
    np.testing.assert_allclose(greedy.logprobs, expected[..., 0], atol=1e-6, rtol=1e-6)
    assert greedy.logprobs.dtype == np.float32 and np.all(greedy.logprobs < 0)
    lean = generate(gen_cfg, gen_vars, PROMPTS, max_new_tokens=N_NEW)
    assert lean.logits is None
    np.testing.assert_array_equal(lean.tokens, greedy.tokens)
    np.testing.assert_array_equal(lean.logprobs, greedy.logprobs)
    hot = generate(
        gen_cfg, gen_vars, PROMPTS, max_new_tokens=N_NEW, temperature=0.5, top_k=3, seed=1, return_logits=True
    )
    expected = np.take_along_axis(jax.nn.log_softmax(hot.logits, axis=-1), hot.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(hot.logprobs, expected, atol=1e-6, rtol=1e-6)


def test_stop_tokens_stop_rows_independently(gen_cfg, gen_vars, greedy):
    tokens = greedy.tokens

    # A stop token that row 0 emits first at step >= 1 and that row 1 emits later or never.
    def first(row, tok):
        hits = np.flatnonzero(tokens[row] == tok)
        return int(hits[0]) if hits.size else N_NEW

    candidates = [(int(t), first(0, t), first(1, t)) for t in tokens[0]]
    stop, s0, s1 = next(((t, a, b) for t, a, b in candidates if 1 <= a < b), (None, 0, 0))
    assert stop is not None, f"no usable stop token in {tokens}"
    pad = gen_cfg.pad_token_id
    out = generate(gen_cfg, gen_vars, PROMPTS, max_new_tokens=N_NEW, stop_tokens=[stop])
    for row, s in ((0, s0), (1, s1)):
        n = min(s + 1, N_NEW)  # the stop token itself is kept
        assert out.lengths[row] == n
        np.testing.assert_array_equal(out.tokens[row, :n], tokens[row, :n])
        assert np.all(out.tokens[row, n:] == pad), out.tokens[row]
    assert out.tokens[0, s0] == stop
    np.testing.assert_array_equal(out.logprobs[0, s0 + 1 :], 0.0)  # 0 after a row stops
    np.testing.assert_array_equal(out.logprobs[0, : s0 + 1], greedy.logprobs[0, : s0 + 1])


def test_temperature_with_top_k_1_is_greedy(gen_cfg, gen_vars, greedy):
    out = generate(gen_cfg, gen_vars, PROMPTS, max_new_tokens=N_NEW, temperature=0.7, top_k=1, seed=123)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_sampling_is_deterministic_per_seed_and_respects_top_p(gen_cfg, gen_vars):
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, return_logits=True)
    a = generate(gen_cfg, gen_vars, PROMPTS, seed=3, **kw)
    b = generate(gen_cfg, gen_vars, PROMPTS, seed=3, **kw)
    c = generate(gen_cfg, gen_vars, PROMPTS, seed=4, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    for out in (a, c):  # every sampled token lies in the nucleus of its step's distribution
        probs = jax.nn.softmax(out.logits, axis=-1)
        for i in range(2):
            for t in range(N_NEW):
                p = np.asarray(probs[i, t])
                mass_before = p[p > p[out.tokens[i, t]]].sum()
                assert mass_before < 0.9, (i, t)


# --------------------------------------------------------------------------- sample_logits
LOGITS = np.log(np.array([0.05, 0.30, 0.02, 0.25, 0.20, 0.10, 0.05, 0.03], np.float32))
N = 4000


_sample = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))


def _samples(seed=0, **kw):
    """N draws from one crafted distribution (N identical rows)."""
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N, LOGITS.size))
    return np.asarray(_sample(logits, jax.random.key(seed), **kw))


def test_sample_greedy_is_argmax_lowest_id_on_ties():
    logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    out = sample_logits(logits, jax.random.key(0), temperature=0.0, top_k=0, top_p=1.0)
    np.testing.assert_array_equal(out, [1, 0])
    assert out.dtype == jnp.int32


def test_sample_top_k_restricts_to_k_most_likely():
    s = _samples(temperature=1.0, top_k=3, top_p=1.0)
    top3 = set(np.argsort(-LOGITS)[:3].tolist())  # ids 1, 3, 4
    assert set(np.unique(s).tolist()) == top3
    freq = np.bincount(s, minlength=LOGITS.size)[sorted(top3)] / N
    p = np.exp(LOGITS[sorted(top3)]) / np.exp(LOGITS[sorted(top3)]).sum()
    np.testing.assert_allclose(freq, p, atol=0.04)  # ~5 sigma for N = 4000


def test_sample_temperature_matches_softmax():
    s = _samples(seed=1, temperature=2.0, top_k=0, top_p=1.0)
    p = np.exp(LOGITS / 2.0) / np.exp(LOGITS / 2.0).sum()
    np.testing.assert_allclose(np.bincount(s, minlength=LOGITS.size) / N, p, atol=0.035)


def test_sample_top_p_keeps_smallest_prefix_reaching_p():
    s = _samples(seed=2, temperature=1.0, top_k=0, top_p=0.5)  # 0.30 + 0.25 >= 0.5: ids {1, 3}
    assert set(np.unique(s).tolist()) == {1, 3}
    tiny = _samples(seed=3, temperature=1.0, top_k=0, top_p=1e-6)
    assert np.all(tiny == np.argmax(LOGITS))


def test_sample_same_seed_same_tokens():
    kw = dict(temperature=1.0, top_k=0, top_p=1.0)
    np.testing.assert_array_equal(_samples(seed=7, **kw), _samples(seed=7, **kw))
    assert not np.array_equal(_samples(seed=7, **kw), _samples(seed=8, **kw))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "prompts,kwargs,match",
    [
        ([[1, 2], [3, 64, 4]], {}, r"prompt 1: token id 64 at position \(1,\).*\[0, 64\)"),
        ([[1, 2], [-3]], {}, r"prompt 1: token id -3"),
        ([[1, 2], []], {}, r"prompt 1 is empty"),
        ([], {}, r"at least one prompt"),
        ([[1, 2]], dict(temperature=-0.5), r"temperature must be >= 0, got -0.5"),
        ([[1, 2]], dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        ([[1, 2]], dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        ([[1, 2]], dict(temperature=1.0, top_k=65), r"top_k must be in \[0, vocab_size=64\], got 65"),
        ([[1, 2]], dict(stop_tokens=[70]), r"stop_tokens: token id 70"),
        ([[1, 2]], dict(temperature=float("nan")), r"temperature must be a finite number, got nan"),
        ([[1, 2]], dict(temperature=float("inf")), r"temperature must be a finite number, got inf"),
        ([[1, 2]], dict(temperature="0.7"), r"temperature must be a number, got str '0.7'"),
        ([[1, 2]], dict(temperature=1.0, top_p=float("nan")), r"top_p must be a finite number, got nan"),
        ([[1, 2]], dict(temperature=1.0, top_k=2.7), r"top_k must be an integer .*got float 2.7"),
        ([[1, 2]], dict(temperature=1.0, top_k=True), r"top_k must be an integer .*got bool True"),
        ([[1, 2], [3, 1.7]], {}, r"prompt 1: token ids must be integers, got dtype float64"),
        ([[[1, 2]]], {}, r"prompt 0 must be a 1-D sequence of token ids, got shape \(1, 2\)"),
        ([[1, 2]], dict(stop_tokens=[1.5]), r"stop_tokens: token ids must be integers"),
        ([[1, 2]], dict(pad_id=0.5), r"pad_id: token ids must be integers"),
        ([[1, 2]], dict(max_new_tokens=2.5), r"max_new_tokens must be an integer, got float 2.5"),
        ([[1, 2]], dict(max_new_tokens=0), r"max_new_tokens must be positive, got 0"),
        (
            [[1, 2, 3]],
            dict(max_new_tokens=62),
            r"prompt length 3 \+ max_new_tokens 62 exceeds max_position_embeddings=64",
        ),
    ],
    ids=[
        "id-too-large",
        "negative-id",
        "empty-prompt",
        "no-prompts",
        "negative-temperature",
        "top-p-zero",
        "top-p-above-one",
        "top-k-above-vocab",
        "stop-token-out-of-range",
        "nan-temperature",
        "inf-temperature",
        "string-temperature",
        "nan-top-p",
        "fractional-top-k",
        "bool-top-k",
        "fractional-prompt-token",
        "2d-prompt",
        "fractional-stop-token",
        "fractional-pad-id",
        "fractional-max-new-tokens",
        "no-new-tokens",
        "too-long",
    ],
)
def test_generate_errors(gen_cfg, gen_vars, prompts, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(gen_cfg, gen_vars, prompts, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=float("nan"), top_k=0, top_p=1.0), r"temperature must be a finite number"),
        (dict(temperature=1.0, top_k=2.7, top_p=1.0), r"top_k must be an integer"),
        (dict(temperature=1.0, top_k=9, top_p=1.0), r"top_k must be in \[0, vocab_size=8\], got 9"),
    ],
)
def test_sample_logits_checks_its_settings_at_trace_time(kwargs, match):
    """sample_logits is public too: NaN temperature used to give token 0 every time."""
    with pytest.raises(ValueError, match=match):
        sample_logits(jnp.zeros((2, 8)), jax.random.key(0), **kwargs)


def test_decode_state_is_named():
    from ling_jax.decoding.generate import _DecodeState

    assert _DecodeState._fields == (
        "step",
        "cache",
        "logits_BV",
        "pos_B",
        "done_B",
        "rng",
        "tokens_BN",
        "logprobs_BN",
        "logits_BNV",
        "lengths_B",
    )


# --------------------------------------------------------------------------- ling-jax generate
def _generate_cli(*args):
    from multidevice.common import REPO_ROOT, subprocess_env

    return subprocess.run(
        [sys.executable, "-m", "ling_jax.cli", "generate", *args],
        cwd=REPO_ROOT,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_generate_cli_needs_one_source():
    proc = _generate_cli("--max-new-tokens", "4")
    assert proc.returncode == 2, proc.stderr
    assert "give exactly one of --workdir RUN or --hf DIR" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_generate_cli_streams_a_run_plain_and_speculative(tmp_path):
    """A 6-step run of the small config: the default prompt (the run's sample prompt), greedy; the
    speculative text equals the plain text; each output ends with one statistics line."""
    from multidevice.common import train_cli

    workdir = tmp_path / "run"
    train_cli(workdir, train=dict(steps=6, sample_tokens=0, log_every=3))
    texts = []
    for extra in ([], ["--speculative", "mtp", "--draft-tokens", "2"]):
        proc = _generate_cli("--workdir", str(workdir), "--max-new-tokens", "10", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.rstrip("\n").split("\n")
        stats = lines[-1]
        assert stats.startswith("stats: 10 tokens, ") and "tokens/s decode" in stats, stats
        if extra:
            assert "acceptance " in stats and "tokens per verify step (k=2)" in stats, stats
        text = "\n".join(lines[:-1])
        assert text.startswith("def "), text  # the run's train.sample_prompt
        texts.append(text)
    assert texts[0] == texts[1]
