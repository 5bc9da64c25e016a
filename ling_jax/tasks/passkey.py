"""Passkey retrieval: a number hidden at a chosen depth in filler text, asked for at the end.

A sample of `length` tokens is

    [filler prefix] [needle] [filler suffix] [question] [answer]

with needle " The pass key is 71432. Remember it. ", question " What is the pass key? The pass key
is " and answer "71432" (`digits` random digits). The filler repeats `FILLER` (it has no digits,
so the key occurs in the prompt exactly once, in the needle) from a random phase and is cut to
whatever token count makes the sample exactly `length` tokens. The needle starts at token
round(depth * F) of the F filler tokens: depth 0 puts it first, depth 1 right before the question.
Everything is composed at the token level, so the length and the needle's position are exact for
any tokenizer; with the byte tokenizer every digit is one token.

Scoring (`score_logits`) is teacher-forced: the model reads prompt + answer[:-1] once, and a sample
counts as retrieved when the argmax of the logits at every answer position is the answer token.
That is exactly what greedy decoding of the answer's tokens would produce (each greedy step sees the
same prefix as long as the previous tokens were right), in one forward pass instead of one per digit.

The same samples, eos-terminated and exactly one packed row long, form the training mix
(`ling_jax.data.pipeline`, `data.passkey_fraction`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from ling_jax.config import ModelConfig
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.model import LingModel

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is "
DEFAULT_DIGITS = 5
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    """One sample: `tokens` [length] = prompt then answer; the answer is the last `answer_len` tokens."""

    tokens: np.ndarray  # int32 [length]
    answer_len: int
    passkey: str
    depth: float
    needle_start: int  # token index where the needle begins
    needle_len: int

    @property
    def prompt(self) -> np.ndarray:
        return self.tokens[: len(self.tokens) - self.answer_len]

    @property
    def answer(self) -> np.ndarray:
        return self.tokens[len(self.tokens) - self.answer_len :]


def _ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def min_length(tokenizer: Tokenizer, digits: int = DEFAULT_DIGITS) -> int:
    """The shortest sample: needle, question and answer with no filler."""
    key = "0" * digits
    return len(_ids(tokenizer, NEEDLE.format(key=key))) + len(_ids(tokenizer, QUESTION)) + len(_ids(tokenizer, key))


def check_request(tokenizer: Tokenizer, length: int, depths: Sequence[float], digits: int = DEFAULT_DIGITS) -> None:
    """ValueError naming the argument (length, depth, digits) that cannot make a sample."""
    if digits < 1:
        raise ValueError(f"passkey digits must be >= 1, got {digits}")
    shortest = min_length(tokenizer, digits)
    if length < shortest:
        raise ValueError(
            f"passkey length {length} is shorter than the needle, question and answer alone ({shortest} tokens)"
        )
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth {depth} is outside [0, 1] (a fraction of the context)")


def make_sample(
    tokenizer: Tokenizer,
    length: int,
    depth: float,
    rng: np.random.Generator,
    *,
    digits: int = DEFAULT_DIGITS,
    filler: str = FILLER,
) -> PasskeySample:
    """A sample of exactly `length` tokens with the needle at `depth`; the key and the filler's phase
    come from `rng`. `filler` must contain no digit (the key must be the only number in the prompt)."""
    check_request(tokenizer, length, [depth], digits)
    if any(c.isdigit() for c in filler) or not filler.strip():
        raise ValueError(f"passkey filler must be non-empty text without digits, got {filler[:40]!r}")
    first = str(rng.integers(1, 10))  # no leading zero: the key reads as a number
    passkey = first + "".join(str(d) for d in rng.integers(0, 10, size=digits - 1))
    needle_N = _ids(tokenizer, NEEDLE.format(key=passkey))
    question_Q = _ids(tokenizer, QUESTION)
    answer_A = _ids(tokenizer, passkey)
    num_filler = length - len(needle_N) - len(question_Q) - len(answer_A)
    if num_filler < 0:  # a tokenizer that merges this key's digits differently from min_length's zeros
        raise ValueError(f"passkey length {length} is too short for key {passkey} ({length - num_filler} tokens)")
    period_P = _ids(tokenizer, filler)
    phase = int(rng.integers(0, len(period_P)))
    repeats = -(-(phase + num_filler) // len(period_P))
    filler_F = np.tile(period_P, max(repeats, 1))[phase : phase + num_filler]
    needle_start = int(round(depth * num_filler))
    tokens = np.concatenate([filler_F[:needle_start], needle_N, filler_F[needle_start:], question_Q, answer_A])
    return PasskeySample(
        tokens=tokens.astype(np.int32),
        answer_len=len(answer_A),
        passkey=passkey,
        depth=float(depth),
        needle_start=needle_start,
        needle_len=len(needle_N),
    )


def sample_rng(seed: int, *index: int) -> np.random.Generator:
    """The generator of sample `index` under `seed` (independent streams, same for every caller)."""
    return np.random.default_rng([int(seed), *map(int, index)])


def eval_samples(
    tokenizer: Tokenizer, length: int, depths: Sequence[float], samples: int, seed: int, digits: int = DEFAULT_DIGITS
) -> dict[float, list[PasskeySample]]:
    """`samples` samples of `length` tokens at each depth; deterministic in `seed`."""
    if samples < 1:
        raise ValueError(f"passkey samples must be >= 1, got {samples}")
    check_request(tokenizer, length, depths, digits)
    return {
        float(d): [make_sample(tokenizer, length, d, sample_rng(seed, i, s), digits=digits) for s in range(samples)]
        for i, d in enumerate(depths)
    }


def training_documents(
    tokenizer: Tokenizer, num: int, length: int, seed: int, digits: int = DEFAULT_DIGITS
) -> list[np.ndarray]:
    """`num` samples of `length` tokens with depths uniform in [0, 1], as token arrays (training mix)."""
    docs = []
    for i in range(num):
        rng = sample_rng(seed, 1 << 20, i)  # a stream apart from eval_samples' (depth index < 2^20)
        docs.append(make_sample(tokenizer, length, float(rng.uniform()), rng, digits=digits).tokens)
    return docs


def accuracy(
    model_cfg: ModelConfig, variables, samples_by_depth: dict[float, list[PasskeySample]], batch_size: int = 8
) -> dict[float, float]:
    """Fraction of samples retrieved at each depth, for a model's `variables` ({"params",
    "expert_bias"}); one jitted forward pass per batch of `batch_size` samples (the last one padded
    by repeating a sample, its extra scores dropped)."""
    if batch_size < 1:
        raise ValueError(f"passkey batch_size must be >= 1, got {batch_size}")
    result = {}
    for depth, samples in samples_by_depth.items():
        hits = []
        for start in range(0, len(samples), batch_size):
            chunk = list(samples[start : start + batch_size])
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            inputs_BT = np.stack([s.tokens[:-1] for s in padded])
            logits_BTV = _answer_logits(variables, inputs_BT, model_cfg, max(s.answer_len for s in chunk))
            hits.append(score_logits(logits_BTV, chunk, offset=inputs_BT.shape[1] - logits_BTV.shape[1]))
        result[depth] = float(np.concatenate(hits).mean())
    return result


@functools.partial(jax.jit, static_argnames=("model_cfg", "last"))
def _answer_logits(variables, inputs_BT, model_cfg: ModelConfig, last: int):
    """Logits of the last `last` input positions only ([B, last, V]): all that scoring reads."""
    out = LingModel(model_cfg).apply(variables, inputs_BT, with_mtp=False)
    return out.logits[:, -last:]


def score_logits(logits_BTV: np.ndarray, samples: Sequence[PasskeySample], offset: int = 0) -> np.ndarray:
    """[B] bool: retrieved. `logits_BTV` are the model's logits for inputs `tokens[:-1]` of each sample
    (all the same length), or for its positions from `offset` on: the answer is retrieved when every
    answer token is the argmax at the position before it (the module docstring: equal to greedy
    decoding of the answer)."""
    logits_BTV = np.asarray(logits_BTV)
    T = offset + logits_BTV.shape[1]
    correct = []
    for b, sample in enumerate(samples):
        if len(sample.tokens) - 1 != T:
            raise ValueError(f"sample {b} has {len(sample.tokens)} tokens; logits cover {T} inputs (expected T + 1)")
        if sample.answer_len > logits_BTV.shape[1]:
            raise ValueError(
                f"sample {b}: the logits cover {logits_BTV.shape[1]} positions, its answer {sample.answer_len}"
            )
        predicted_A = logits_BTV[b, logits_BTV.shape[1] - sample.answer_len :].argmax(-1)
        correct.append(bool(np.array_equal(predicted_A, sample.answer)))
    return np.array(correct, dtype=bool)
