"""Tokenizers: a small protocol, a byte-level tokenizer and a wrapper around HF `tokenizers`.

Also `check_token_ids`, the host-side check that every id fed to a model lies in [0, vocab_size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# Special tokens tried, in order, when an HF tokenizer's eos / bos / pad id is not given.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>", "<eos>")
BOS_CANDIDATES = ("<|startoftext|>", "<s>", "<|begin_of_text|>", "<bos>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def check_token_ids(ids: np.ndarray, vocab_size: int, *, what: str) -> None:
    """Raises ValueError unless every entry of `ids` is an integer in [0, vocab_size).

    The message names `what` (e.g. "train batch inputs"), the first offending id, its position
    (a tuple index into `ids`) and the valid range.
    """
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what}: token ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if not bad.any():
        return
    flat_index = int(np.argmax(bad.reshape(-1)))
    position = tuple(int(i) for i in np.unravel_index(flat_index, ids.shape))
    value = int(ids.reshape(-1)[flat_index])
    raise ValueError(
        f"{what}: token id {value} at position {position} is outside the valid range "
        f"[0, {vocab_size}) ({int(bad.sum())} of {ids.size} ids are out of range)"
    )


class ByteTokenizer:
    """UTF-8 byte-level tokenizer.

    Ids 0..255 are the bytes of the UTF-8 encoding, 256 is eos (also the document separator when
    packing) and 257 is pad, so `vocab_size` is 258. There is no bos token. `decode` drops the
    special ids and decodes the remaining bytes with errors="replace", so any id sequence (for
    instance one cut in the middle of a multi-byte character) decodes without raising.
    """

    NUM_BYTES = 256
    EOS_ID = 256
    PAD_ID = 257

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + 2

    @property
    def eos_id(self) -> int:
        return self.EOS_ID

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def pad_id(self) -> int:
        return self.PAD_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path used by packing: the same ids as `encode`, as a uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        check_token_ids(ids_N, self.vocab_size, what="ByteTokenizer.decode")
        byte_ids_N = ids_N[ids_N < self.NUM_BYTES].astype(np.uint8)
        return byte_ids_N.tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258, eos_id=256, pad_id=257)"


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json file (e.g. the official Ling one).

    `encode` adds no special tokens (packing appends eos itself); `decode` skips special tokens.
    eos / bos / pad ids come from the arguments, else from the first of the common special tokens
    (`EOS_CANDIDATES`, ...) present in the vocabulary; a missing eos is an error, bos and pad may be
    None. `vocab_size` counts added tokens; a model's embedding table may be larger (padded).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        eos_id: int | None = None,
        bos_id: int | None = None,
        pad_id: int | None = None,
    ):
        import tokenizers  # Imported lazily: byte-level users do not need it.

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"tokenizer file {str(self.path)!r} does not exist or is not a file")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files.
            raise ValueError(
                f"{str(self.path)!r} is not a valid HF tokenizer.json file ({type(e).__name__}: {e})"
            ) from e
        self._vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._eos_id = self._resolve(eos_id, EOS_CANDIDATES, "eos")
        if self._eos_id is None:
            raise ValueError(
                f"tokenizer {str(self.path)!r} has none of the eos tokens {EOS_CANDIDATES}; pass eos_id explicitly"
            )
        self._bos_id = self._resolve(bos_id, BOS_CANDIDATES, "bos")
        self._pad_id = self._resolve(pad_id, PAD_CANDIDATES, "pad")

    def _resolve(self, given: int | None, candidates: Sequence[str], name: str) -> int | None:
        if given is not None:
            check_token_ids(np.array([given]), self._vocab_size, what=f"{name}_id for {self.path}")
            return int(given)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts at once (in parallel inside `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        check_token_ids(ids_N, self._vocab_size, what=f"HFTokenizer({self.path}).decode")
        return self._tok.decode(ids_N.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({str(self.path)!r}, vocab_size={self._vocab_size}, eos_id={self._eos_id}, "
            f"bos_id={self._bos_id}, pad_id={self._pad_id})"
        )


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """ "byte" -> ByteTokenizer; a tokenizer.json path, or a directory holding one -> HFTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if not candidate.is_file():
            raise ValueError(f"directory {spec!r} has no tokenizer.json")
        path = candidate
    elif not path.exists():
        raise ValueError(f"tokenizer spec {spec!r} is neither 'byte' nor an existing tokenizer.json file or directory")
    if path.suffix != ".json":
        raise ValueError(f"tokenizer file {str(path)!r} is not a .json file (expected tokenizer.json)")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer file {str(path)!r} is not valid JSON: {e}") from e
    return HFTokenizer(path)
