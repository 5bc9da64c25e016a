"""The embedded verifiable task: multi-digit addition and subtraction with exact answers.

Everything post-training needs to run offline, with no data set to download:

    from ling_jax.tasks import arithmetic as task
    heldout = task.make_split("heldout", 500, seed=0)     # list[Problem], distinct problems
    train = task.make_split("train", 20_000, seed=0)      # never a held-out problem
    p = train[0]                                          # Problem(a=347, b=85, op="+")
    p.prompt, p.answer                                    # "347+85", "432"
    task.sft_trace(p, think=True)                         # "<think>7+5+0=12,4+8+1=13,3+0+1=04</think>432"
    task.sft_trace(p, think=True, verbose=True)           # "<think>7+5+0=12,4+8+1=13,3+0+1=04,all done</think>432"
    task.sft_trace(p, think=False)                        # "432"
    task.check("<think>...</think>432", p)                # True

Problems. `a op b` with `op` in `TaskConfig.ops` ("+" and "-"), each operand drawn uniformly from
[0, 10^max_digits); for "-" the operands are ordered so that a >= b (answers are never negative).

Splits. Which split a problem belongs to is a function of the problem alone (a hash of
"a op b"): `HELDOUT_BUCKETS` of every `SPLIT_BUCKETS` hash buckets are held out. So the train and
held-out splits can never overlap, whatever the seeds, sizes or order of the calls, and a split
is reproducible from (name, n, seed, config). `make_split("heldout", ...)` returns distinct
problems; "train" samples with replacement (a long SFT run sees problems again).

Traces. Think-on: the column-wise computation from the least significant digit, one "sentence"
per column separated by commas (LPO's sentence units), inside <think>...</think>, then the answer.
A column reads "x+y+c=cd" (addition: c the carry in, "cd" the two-digit column sum: carry out, then
the answer digit) or "x-y-c=bd" (subtraction: c the borrow in, b the borrow out, d the digit), with
the shorter operand zero-padded. With `verbose=True` the trace ends with one more sentence,
`VERBOSE_STEP` ("all done"): filler the answer does not need, the toy form of a reasoning model's
padding, so a trace with it and one without are both right and differ only in length (the SFT data
mixes them, `sft.verbose_fraction`, and the RL length reward has something to remove).
Think-off: the answer alone. The traces are short on purpose:
the tiny preset reads bytes, so every character is a token.

Checking. `check(completion, problem)` is exact: the answer is what follows the last "</think>"
(a completion that opens <think> and never closes it has no answer), with surrounding whitespace
and a trailing "<|role_end|>" removed; it must be one integer (optionally after "=" or
"answer:"), equal to the answer. Several numbers, words, or an empty answer are wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

SPLITS = ("train", "heldout")
SPLIT_BUCKETS = 20  # a problem's hash bucket decides its split ...
HELDOUT_BUCKETS = 1  # ... buckets [0, HELDOUT_BUCKETS) are held out: 5% of the problem space
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
VERBOSE_STEP = "all done"  # the optional last sentence of a verbose think-on trace
ROLE_END_TEXT = "<|role_end|>"  # may end a decoded completion (ling_jax/data/chat.py)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The problem family: operands below 10**max_digits, operators from `ops`."""

    max_digits: int = 3
    ops: tuple[str, ...] = ("+", "-")

    def __post_init__(self):
        if not 1 <= self.max_digits <= 9:
            raise ValueError(f"max_digits must be in [1, 9], got {self.max_digits}")
        if not self.ops or any(op not in ("+", "-") for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of ('+', '-'), got {self.ops!r}")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops has repeated operators: {self.ops!r}")

    @property
    def num_problems(self) -> int:
        """The number of distinct problems (for "-", the ordered pairs with a >= b)."""
        n = 10**self.max_digits
        return sum(n * n if op == "+" else n * (n + 1) // 2 for op in self.ops)


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str

    @property
    def prompt(self) -> str:
        """The user's message: "347+85"."""
        return f"{self.a}{self.op}{self.b}"

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def answer(self) -> str:
        return str(self.value)

    @property
    def split(self) -> str:
        return split_of(self)


def split_of(problem: Problem) -> str:
    """ "heldout" or "train": a pure function of the problem (see the module docstring)."""
    digest = hashlib.blake2b(problem.prompt.encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % SPLIT_BUCKETS < HELDOUT_BUCKETS else "train"


def _draw(rng: np.random.Generator, config: TaskConfig) -> Problem:
    op = config.ops[int(rng.integers(len(config.ops)))]
    a, b = (int(x) for x in rng.integers(0, 10**config.max_digits, size=2))
    if op == "-" and a < b:
        a, b = b, a
    return Problem(a, b, op)


def make_split(name: str, n: int, seed: int = 0, config: TaskConfig | None = None) -> list[Problem]:
    """`n` problems of split `name` ("train" or "heldout"), reproducible from the arguments.

    "heldout" problems are distinct (ValueError when the split has fewer than `n`); "train" ones
    are drawn with replacement. No problem is ever in both splits."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; the splits are {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = config or TaskConfig()
    if name == "heldout" and n > config.num_problems * HELDOUT_BUCKETS * 4 // (SPLIT_BUCKETS * 5):
        raise ValueError(
            f"{n} distinct held-out problems asked of a family of {config.num_problems} problems "
            f"(about {config.num_problems * HELDOUT_BUCKETS // SPLIT_BUCKETS} held out); raise max_digits"
        )
    # The split name in the seed: the two splits' streams are independent for one seed.
    rng = np.random.default_rng([seed, SPLITS.index(name), config.max_digits])
    problems: list[Problem] = []
    seen: set[Problem] = set()
    while len(problems) < n:
        p = _draw(rng, config)
        if split_of(p) != name or (name == "heldout" and p in seen):
            continue
        seen.add(p)
        problems.append(p)
    return problems


def _digits(x: int, width: int) -> list[int]:
    """The `width` decimal digits of x, least significant first."""
    return [(x // 10**i) % 10 for i in range(width)]


def think_steps(problem: Problem) -> list[str]:
    """The column steps of the think-on trace, least significant column first."""
    width = max(len(str(problem.a)), len(str(problem.b)))
    steps, carry = [], 0
    for x, y in zip(_digits(problem.a, width), _digits(problem.b, width)):
        if problem.op == "+":
            total = x + y + carry
            out, digit = divmod(total, 10)
        else:
            diff = x - y - carry
            out, digit = (1, diff + 10) if diff < 0 else (0, diff)
        steps.append(f"{x}{problem.op}{y}{problem.op}{carry}={out}{digit}")
        carry = out
    return steps


def sft_trace(problem: Problem, think: bool, verbose: bool = False) -> str:
    """The assistant's reply the SFT data teaches: think-on "<think>steps</think>answer" (with
    `verbose`, the steps end with VERBOSE_STEP), think-off the answer alone."""
    if not think:
        if verbose:
            raise ValueError("verbose=True needs think=True: a think-off reply has no trace to extend")
        return problem.answer
    steps = think_steps(problem) + ([VERBOSE_STEP] if verbose else [])
    return f"{THINK_OPEN}{','.join(steps)}{THINK_CLOSE}{problem.answer}"


_ANSWER = re.compile(r"(?:answer\s*[:=]?|=)?\s*([+-]?\d+)\s*\.?", re.IGNORECASE)


def extract_answer(completion: str) -> int | None:
    """The integer a completion answers, or None when it gives no single integer answer."""
    text = completion.strip()
    if text.endswith(ROLE_END_TEXT):
        text = text[: -len(ROLE_END_TEXT)]
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    elif THINK_OPEN in text:  # thinking never ended: no answer was given
        return None
    match = _ANSWER.fullmatch(text.strip())
    return int(match.group(1)) if match else None


def check(completion: str, problem: Problem) -> bool:
    """True when the completion's final answer (see `extract_answer`) equals the problem's."""
    return extract_answer(completion) == problem.value
