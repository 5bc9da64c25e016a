"""Rollouts: render the task's prompts in the chat format, sample G completions of each with the
project's jitted KV-cache sampler (recording each token's temperature-1 log-prob), decode them and
lay them out as an update batch (see ling_jax/rl/update.py for the layout). Held-out accuracy is
ling_jax/posttrain/accuracy.py's, the same measure SFT reports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from ling_jax.decoding.generate import generate
from ling_jax.posttrain import accuracy
from ling_jax.rl import update as keys
from ling_jax.rl.units import sentence_unit_ids
from ling_jax.tasks import arithmetic

PROMPT_WIDTH_MULTIPLE = 32  # prompts are left-padded to a multiple of this: few distinct compiled shapes
PIECE_CONTEXT = 8  # tokens of left context when decoding one token's text (a split UTF-8 character)


@dataclasses.dataclass
class Rollout:
    batch: dict[str, np.ndarray]  # the update batch without advantages / reference log-probs
    completions: list[str]  # decoded responses (without the stop token)
    lengths_R: np.ndarray  # response tokens, the stop token included
    tokens_per_s: float  # sampled tokens per second of the sampler call


def prompt_ids(problems: Sequence[arithmetic.Problem], tokenizer, think: bool) -> list[np.ndarray]:
    return [accuracy.prompt_ids(p, tokenizer, think=think) for p in problems]


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded response: decode(ids[:t+1]) minus decode(ids[:t]),
    with PIECE_CONTEXT tokens of context (so a byte tokenizer's multi-byte character, e.g. a CJK
    full stop, shows up in the piece of its last byte)."""
    pieces = []
    for t in range(len(ids)):
        lo = max(0, t - PIECE_CONTEXT)
        before, after = tokenizer.decode(list(ids[lo:t])), tokenizer.decode(list(ids[lo : t + 1]))
        common = 0
        while common < min(len(before), len(after)) and before[common] == after[common]:
            common += 1
        pieces.append(after[common:])
    return pieces


def completion_text(tokenizer, tokens: np.ndarray, length: int, stop_id: int) -> str:
    ids = tokens[:length].tolist()
    if ids and ids[-1] == stop_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def _prompt_width(prompts: Sequence[np.ndarray]) -> int:
    longest = max(len(p) for p in prompts)
    return -(-longest // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE


def layout_batch(prompts: Sequence[np.ndarray], tokens_RN: np.ndarray, lengths_R: np.ndarray, pad_id: int):
    """The teacher-forced arrays (inputs, targets, positions, segment ids: [R, Tp + N - 1]) and the
    response mask [R, N] of prompts + sampled responses, laid out as ling_jax/rl/update.py says."""
    R, N = tokens_RN.shape
    Tp = _prompt_width(prompts)
    full_RL = np.full((R, Tp + N), pad_id, np.int32)
    segments_RL = np.zeros((R, Tp + N), np.int32)
    positions_RL = np.zeros((R, Tp + N), np.int32)
    for r, p in enumerate(prompts):
        start = Tp - len(p)
        full_RL[r, start:Tp] = p
        full_RL[r, Tp:] = tokens_RN[r]
        segments_RL[r, start:] = 1
        positions_RL[r, start:] = np.arange(Tp + N - start)
    mask_RN = (np.arange(N)[None, :] < np.asarray(lengths_R)[:, None]).astype(np.float32)
    return {
        keys.INPUTS: full_RL[:, :-1],
        keys.TARGETS: full_RL[:, 1:],
        keys.POSITIONS: positions_RL[:, :-1],
        keys.SEGMENT_IDS: segments_RL[:, :-1],
        keys.MASK: mask_RN,
    }


def sample_rollout(
    model_cfg,
    variables,
    prompts: Sequence[np.ndarray],
    tokenizer,
    *,
    rl,
    seed: int,
    stop_id: int,
    pad_id: int,
    mesh=None,
) -> Rollout:
    """Samples one completion per prompt row (repeat each prompt G times for groups)."""
    start = time.perf_counter()
    out = generate(
        model_cfg,
        variables,
        prompts,
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=rl.top_p,
        stop_tokens=[stop_id],
        seed=seed,
        pad_id=pad_id,
        mesh=mesh,
    )
    elapsed = time.perf_counter() - start
    tokens_RN, lengths_R = np.asarray(out.tokens), np.asarray(out.lengths)
    batch = layout_batch(prompts, tokens_RN, lengths_R, pad_id)
    batch[keys.OLD_LOGP] = np.asarray(out.logprobs, np.float32) * batch[keys.MASK]
    units = np.zeros(tokens_RN.shape, np.int32)
    for r in range(len(prompts)):
        n = int(lengths_R[r])
        units[r, :n] = sentence_unit_ids(token_pieces(tokenizer, tokens_RN[r, :n].tolist()))
    batch[keys.UNIT_IDS] = units
    completions = [completion_text(tokenizer, tokens_RN[r], int(lengths_R[r]), stop_id) for r in range(len(prompts))]
    return Rollout(batch, completions, lengths_R, float(lengths_R.sum()) / max(elapsed, 1e-9))
