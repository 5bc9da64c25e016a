"""Passkey retrieval (ling_jax/tasks/passkey.py) and `ling-jax eval --task passkey`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from multidevice.common import finish_cli, run_cli, start_cli, train_cli

from ling_jax.data.tokenizer import ByteTokenizer
from ling_jax.decoding import generate
from ling_jax.model import init_variables
from ling_jax.tasks import passkey

TOK = ByteTokenizer()


def _text(ids) -> str:
    return TOK.decode(np.asarray(ids).tolist())


# ---------------------------------------------------------------- samples


def test_samples_are_deterministic_in_the_seed():
    a = passkey.eval_samples(TOK, 300, [0.0, 0.5], samples=3, seed=7)
    b = passkey.eval_samples(TOK, 300, [0.0, 0.5], samples=3, seed=7)
    c = passkey.eval_samples(TOK, 300, [0.0, 0.5], samples=3, seed=8)
    for depth in (0.0, 0.5):
        for x, y in zip(a[depth], b[depth]):
            np.testing.assert_array_equal(x.tokens, y.tokens)
            assert x.passkey == y.passkey
    keys_a = [s.passkey for d in a.values() for s in d]
    keys_c = [s.passkey for d in c.values() for s in d]
    assert keys_a != keys_c
    assert len(set(keys_a)) > 1  # the samples of one call differ from each other


@pytest.mark.parametrize("length", [passkey.min_length(TOK), 97, 256, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_depth_placement_length_and_a_single_answer(length, depth):
    sample = passkey.make_sample(TOK, length, depth, passkey.sample_rng(0, 3))
    tokens = sample.tokens
    assert tokens.shape == (length,) and tokens.dtype == np.int32
    needle = passkey.NEEDLE.format(key=sample.passkey)
    question = passkey.QUESTION
    num_filler = length - len(needle) - len(question) - len(sample.passkey)
    assert sample.needle_start == round(depth * num_filler)
    assert _text(tokens[sample.needle_start : sample.needle_start + sample.needle_len]) == needle
    assert _text(sample.answer) == sample.passkey and len(sample.passkey) == passkey.DEFAULT_DIGITS
    prompt = _text(sample.prompt)
    assert prompt.endswith(question)
    assert prompt.count(sample.passkey) == 1  # only in the needle
    assert sum(c.isdigit() for c in prompt) == len(sample.passkey)  # no other digit anywhere
    if depth == 0.0:
        assert sample.needle_start == 0
    if depth == 1.0:  # the needle ends where the question starts
        assert sample.needle_start + sample.needle_len == length - len(question) - len(sample.passkey)


def test_training_documents_cover_depths_and_are_seeded():
    docs = passkey.training_documents(TOK, 40, 200, seed=0)
    again = passkey.training_documents(TOK, 40, 200, seed=0)
    assert all(len(d) == 200 for d in docs)
    for x, y in zip(docs, again):
        np.testing.assert_array_equal(x, y)
    starts = [_text(d).index(" The pass key is") for d in docs]
    assert min(starts) < 40 and max(starts) > 80  # needles spread over the context


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: passkey.make_sample(TOK, 50, 0.5, passkey.sample_rng(0)), "length 50 is shorter"),
        (lambda: passkey.make_sample(TOK, 200, 1.5, passkey.sample_rng(0)), "depth 1.5 is outside [0, 1]"),
        (lambda: passkey.make_sample(TOK, 200, -0.1, passkey.sample_rng(0)), "depth -0.1 is outside [0, 1]"),
        (lambda: passkey.make_sample(TOK, 200, 0.5, passkey.sample_rng(0), filler="day 1. "), "without digits"),
        (lambda: passkey.eval_samples(TOK, 200, [0.5], samples=0, seed=0), "samples must be >= 1"),
    ],
)
def test_bad_requests_name_the_argument(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value)


def test_score_logits_is_exact_match_of_every_answer_token():
    samples = passkey.eval_samples(TOK, 120, [0.5], samples=2, seed=0)[0.5]
    T, V = 119, TOK.vocab_size
    logits_BTV = np.zeros((2, T, V), np.float32)
    for b, s in enumerate(samples):  # logits at t predict token t + 1
        logits_BTV[b, np.arange(T), s.tokens[1:]] = 1.0
    assert passkey.score_logits(logits_BTV, samples).tolist() == [True, True]
    last = samples[1].answer_len
    assert passkey.score_logits(logits_BTV[:, -last:], samples, offset=T - last).tolist() == [True, True]
    wrong = logits_BTV.copy()
    wrong[1, T - 2, :] = 0.0  # one middle digit of sample 1 now predicts token 0
    assert passkey.score_logits(wrong, samples).tolist() == [True, False]
    with pytest.raises(ValueError, match="expected T \\+ 1"):
        passkey.score_logits(logits_BTV[:, :-1], samples)


@pytest.mark.slow  # compiles generate's decode loop: ~40 s on the 2-core host
def test_teacher_forced_scoring_equals_greedy_decoding():
    """A sample counts as retrieved exactly when greedy decoding of answer_len tokens outputs the
    answer: rewriting a sample's answer to the model's greedy output makes it retrieved."""
    cfg = tiny_config(vocab_size=258, eos_token_id=256, pad_token_id=257, max_position_embeddings=128)
    variables = init_variables(cfg, jax.random.key(0))
    samples = passkey.eval_samples(TOK, 110, [0.3], samples=3, seed=0)[0.3]
    A = samples[0].answer_len
    out = generate(cfg, variables, [s.prompt.tolist() for s in samples], max_new_tokens=A, temperature=0.0)
    greedy_BA = np.asarray(out.tokens)[:, :A]
    rewritten = [
        passkey.PasskeySample(
            tokens=np.concatenate([s.prompt, greedy_BA[b]]).astype(np.int32),
            answer_len=A,
            passkey=s.passkey,
            depth=s.depth,
            needle_start=s.needle_start,
            needle_len=s.needle_len,
        )
        for b, s in enumerate(samples)
    ]
    assert passkey.accuracy(cfg, variables, {0.3: rewritten}, batch_size=2) == {0.3: 1.0}
    expected = np.mean([np.array_equal(greedy_BA[b], s.answer) for b, s in enumerate(samples)])
    assert passkey.accuracy(cfg, variables, {0.3: samples}, batch_size=2) == {0.3: expected}


# ---------------------------------------------------------------- the eval command


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    """One train step of the small config at seq_len 96 with half its rows passkey samples."""
    workdir = tmp_path_factory.mktemp("passkey_run")
    train_cli(
        workdir,
        model=dict(max_position_embeddings=128),
        train=dict(steps=1, seq_len=96, batch_size=4, sample_tokens=0, eval_batches=1),
        data=dict(passkey_fraction=0.5, max_tokens=20_000),
    )
    return workdir


def test_eval_passkey_cli_output(passkey_run):
    proc = run_cli("eval", "--workdir", str(passkey_run), "--task", "passkey", "--length", "100", "--depths", "0,0.5,1")
    lines = proc.stdout.strip().splitlines()
    assert lines[-6] == "step 1: passkey retrieval at 100 tokens, 10 samples per depth (seed 0)"
    result = json.loads(lines[-1])
    assert set(result) == {"workdir", "step", "task", "length", "samples", "seed", "accuracy", "overall"}
    assert (result["task"], result["length"], result["samples"], result["step"]) == ("passkey", 100, 10, 1)
    assert list(result["accuracy"]) == ["0.0", "0.5", "1.0"]

    # The same accuracy in-process from the checkpoint's variables.
    from ling_jax.train.init_from import load_init_variables
    from ling_jax.train.run_dir import load_experiment

    exp = load_experiment(passkey_run)
    variables = load_init_variables(passkey_run, exp.model)
    expected = passkey.accuracy(exp.model, variables, passkey.eval_samples(TOK, 100, [0.0, 0.5, 1.0], 10, seed=0))
    assert result["accuracy"] == {str(d): a for d, a in expected.items()}
    for line, (depth, acc) in zip(lines[-5:-2], expected.items()):
        assert line == f"depth {depth:.2f}: {round(acc * 10)}/10 retrieved ({acc:.3f})"
    assert lines[-2] == f"overall: {np.mean(list(expected.values())):.3f}"
    assert result["overall"] == pytest.approx(np.mean(list(expected.values())))


@pytest.mark.slow  # one more CLI process; test_merge_cli covers the held-out eval too
def test_eval_heldout_default_still_works_on_a_passkey_run(passkey_run):
    heldout = json.loads(run_cli("eval", "--workdir", str(passkey_run)).stdout.strip().splitlines()[-1])
    assert set(heldout) == {"workdir", "step", "heldout_loss"} and np.isfinite(heldout["heldout_loss"])


BAD_FLAGS = (
    (["--task", "passkey", "--length", "40"], "bad flag: --length 40 is shorter than the passkey needle"),
    (["--task", "passkey", "--length", "500"], "bad flag: --length 500 needs 499 input positions"),
    (["--task", "passkey"], "bad flag: --task passkey needs --length N"),
    (["--task", "passkey", "--length", "100", "--depths", "0,1.5"], "--depths: 1.5 is outside [0, 1]"),
    (["--task", "passkey", "--length", "100", "--depths", "half"], "--depths: 'half' is not a number"),
    (["--length", "100"], "bad flag: --length is for --task passkey"),
)


def test_eval_passkey_bad_flags(passkey_run):
    """Each bad flag: exit 2 and one line naming the flag, before any checkpoint is read (the
    processes run side by side to keep the test short)."""
    procs = [start_cli("eval", "--workdir", str(passkey_run), *args) for args, _ in BAD_FLAGS]
    for proc, (args, needle) in zip(procs, BAD_FLAGS):
        proc = finish_cli(proc, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ling-jax eval: ") and needle in lines[0], (args, proc.stderr)
