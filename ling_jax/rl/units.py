"""LPO's linguistic units: sentence ids of a response's tokens, from their decoded text.

A unit ends at a token whose text contains pause punctuation (. ! ? ; : , newline, and the CJK
forms 。！？；：，、); the next token starts a new unit. Working on each token's decoded piece makes
this independent of the tokenizer: a byte-level tokenizer gives one character per piece, a BPE
tokenizer pieces such as " world." — either way the unit ends where the text pauses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAUSE_CHARS = frozenset(".!?;:,\n" + "。！？；：，、")


def sentence_unit_ids(pieces: Sequence[str]) -> np.ndarray:
    """[len(pieces)] int32 unit ids (0, 0, 0, 1, 1, ...) of one response's tokens."""
    ids = np.zeros(len(pieces), np.int32)
    unit = 0
    for t, piece in enumerate(pieces):
        if not isinstance(piece, str):
            raise TypeError(f"pieces[{t}] must be the decoded text of a token (str), got {type(piece).__name__}")
        ids[t] = unit
        if any(c in PAUSE_CHARS for c in piece):
            unit += 1
    return ids


def batch_unit_ids(
    pieces_per_row: Sequence[Sequence[str]], width: int, offsets: Sequence[int] | None = None
) -> np.ndarray:
    """[rows, width] int32: each row's sentence ids placed at columns offsets[r] + t (default 0);
    columns outside a response hold 0 (they are masked out of the loss)."""
    out = np.zeros((len(pieces_per_row), width), np.int32)
    for r, pieces in enumerate(pieces_per_row):
        start = 0 if offsets is None else int(offsets[r])
        if start + len(pieces) > width:
            raise ValueError(f"row {r}: {len(pieces)} response tokens from column {start} exceed width {width}")
        out[r, start : start + len(pieces)] = sentence_unit_ids(pieces)
    return out
