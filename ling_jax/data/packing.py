"""Packs tokenized documents into fixed-length training rows (pure numpy, deterministic).

Layout. Every document is tokenized and terminated with eos; the documents are concatenated into
one token stream of length L. Row r covers stream[r*T : r*T + T + 1] (R = T + 1 tokens), so
consecutive rows overlap by one token: the inputs (row[:-1]) of all rows tile the stream exactly
and every next-token transition of the stream is a target exactly once. The last row is padded
with `pad_id` (segment 0).

Per row:
  segment_ids: 1, 2, 3, ... for the documents present in the row, in order; 0 for padding.
  positions:   the offset of the token inside its document, restarting at 0 at each document
               start. A document that began in an earlier row (a long document split across rows)
               also restarts at 0 at the row start: each row is attended to independently.
  loss_mask:   1.0 where the target is from the same document as the input token, else 0.0. So the
               eos closing a document is predicted from that document's last token, the first
               token of the next document is not predicted from the eos, and padding is never a
               target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ling_jax.data import batch as batch_keys
from ling_jax.data.tokenizer import Tokenizer, check_token_ids

# Documents are tokenized in chunks so that `max_tokens` stops work early on a big corpus.
_ENCODE_CHUNK_DOCS = 256


def tokenize_documents(
    docs: Sequence[str], tokenizer: Tokenizer, *, max_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes and eos-terminates documents into one stream.

    Returns (tokens_L, doc_starts_D): the concatenated stream (uint16 when the vocabulary fits,
    else int32) and the stream offset at which each document starts. With `max_tokens`, the stream
    is cut to at most that many tokens (the last document kept may lose its tail and eos).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    eos_1 = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    total = 0
    for chunk_start in range(0, len(docs), _ENCODE_CHUNK_DOCS):
        chunk = docs[chunk_start : chunk_start + _ENCODE_CHUNK_DOCS]
        for i, ids in enumerate(_encode_chunk(tokenizer, chunk)):
            # Checked before the cast to the stream dtype, which would wrap a bad id into the valid range.
            ids = np.asarray(ids)
            check_token_ids(ids, tokenizer.vocab_size, what=f"tokenizer output for document {chunk_start + i}")
            doc_tokens = np.concatenate([ids.astype(dtype, copy=False), eos_1])
            if max_tokens is not None:
                doc_tokens = doc_tokens[: max_tokens - total]
            pieces.append(doc_tokens)
            lengths.append(len(doc_tokens))
            total += len(doc_tokens)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        return np.zeros((0,), dtype), np.zeros((0,), np.int64)
    tokens_L = np.concatenate(pieces)
    check_token_ids(tokens_L, tokenizer.vocab_size, what="tokenized corpus")
    doc_starts_D = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.int64)
    return tokens_L, doc_starts_D


def _encode_chunk(tokenizer: Tokenizer, docs: Sequence[str]) -> list:
    if hasattr(tokenizer, "encode_array"):
        return [tokenizer.encode_array(d) for d in docs]
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(docs)
    return [tokenizer.encode(d) for d in docs]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
    """Random-access packed rows over a token stream (a `grain` data source).

    `rows[i]` is a dict of [T] arrays: `inputs`, `targets`, `segment_ids`, `positions` (int32)
    and `loss_mask` (float32); `rows.batch(indices)` returns the same with a leading [N] axis,
    vectorised. Rows are computed on access from the stream (memory: the stream only).
    """

    tokens_L: np.ndarray
    doc_starts_D: np.ndarray
    seq_len: int
    pad_id: int

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if len(self.tokens_L) < 2:
            raise ValueError(f"the packed corpus has {len(self.tokens_L)} tokens; at least 2 are needed")
        if len(self.doc_starts_D) == 0 or self.doc_starts_D[0] != 0:
            raise ValueError("doc_starts_D must be non-empty and start at 0")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens_L)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts_D)

    def __len__(self) -> int:
        # ceil((L - 1) / T): enough rows for every one of the L - 1 transitions to be a target.
        return -(-(self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return {k: v[0] for k, v in self.batch(np.array([index])).items()}

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at `indices` ([N] ints in [0, len)) as a dict of [N, T] arrays."""
        indices_N = np.asarray(indices, dtype=np.int64)
        T, L = self.seq_len, self.num_tokens
        col_R = np.arange(T + 1, dtype=np.int64)
        stream_idx_NR = indices_N[:, None] * T + col_R[None, :]
        valid_NR = stream_idx_NR < L
        stream_idx_NR = np.minimum(stream_idx_NR, L - 1)

        tokens_NR = np.where(valid_NR, self.tokens_L[stream_idx_NR], self.pad_id).astype(np.int32)
        doc_NR = np.searchsorted(self.doc_starts_D, stream_idx_NR, side="right") - 1
        first_doc_N1 = doc_NR[:, :1]
        segment_NR = np.where(valid_NR, doc_NR - first_doc_N1 + 1, 0).astype(np.int32)
        doc_offset_NR = stream_idx_NR - self.doc_starts_D[doc_NR]
        # The row's first document restarts at position 0 at the row start (it may continue a
        # document from the previous row); later documents start inside the row.
        positions_NR = np.where(doc_NR == first_doc_N1, col_R[None, :], doc_offset_NR)
        positions_NR = np.where(valid_NR, positions_NR, 0).astype(np.int32)

        same_doc_NT = segment_NR[:, 1:] == segment_NR[:, :-1]
        loss_mask_NT = (same_doc_NT & (segment_NR[:, 1:] != 0)).astype(np.float32)
        return {
            batch_keys.INPUTS: tokens_NR[:, :-1],
            batch_keys.TARGETS: tokens_NR[:, 1:],
            batch_keys.SEGMENT_IDS: segment_NR[:, :-1],
            batch_keys.POSITIONS: positions_NR[:, :-1],
            batch_keys.LOSS_MASK: loss_mask_NT,
        }


def pack_documents(
    docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, *, max_tokens: int | None = None
) -> PackedRows:
    """Tokenizes, eos-terminates and packs `docs` into rows of `seq_len` inputs/targets."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not docs:
        raise ValueError("pack_documents: no documents to pack (empty corpus)")
    tokens_L, doc_starts_D = tokenize_documents(docs, tokenizer, max_tokens=max_tokens)
    pad_id = getattr(tokenizer, "pad_id", None)
    return PackedRows(
        tokens_L=tokens_L,
        doc_starts_D=doc_starts_D,
        seq_len=seq_len,
        pad_id=tokenizer.eos_id if pad_id is None else int(pad_id),
    )
