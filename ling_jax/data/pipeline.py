"""Input pipelines: a resumable, process-sharded Grain train iterator, eval batches, a builder.

Train order. Grain shuffles the row indices with `seed`, reshuffling each epoch (`repeat` with
`reseed_each_epoch`), and cuts the endless index stream into global batches of B rows (a batch
may straddle an epoch boundary). Process p of P takes rows [p*B/P, (p+1)*B/P) of every global
batch: the index stream is batched by B/P and process p keeps every P-th local batch from the
p-th on (`MapDataset.slice`), so it only ever reads its own rows. Rows are then materialised with
the vectorised `PackedRows.batch`.

Passkey mix. With `passkey_fraction` f > 0, `build_datasets` adds passkey-retrieval samples
(ling_jax/tasks/passkey.py) to the train rows: one sample per row, exactly a row long (T - 1
tokens and eos, so positions start at 0 with the sample and the needle is always in the row), f of
all train rows (round(f / (1 - f) x the corpus rows)), depths uniform in [0, 1], seeded by `seed`.
The held-out split stays corpus only, so held-out loss means the same with or without the mix.

Resume. `get_state()` returns a small JSON-serializable dict (Grain's iterator state plus the
settings that define the stream); `set_state` checks those settings and restores Grain's state,
after which the iterator yields exactly the batches an uninterrupted run would have. Grain's state
counts global batches, so a state also restores onto a different process count as long as the
global batch size, seed and rows are the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import grain
import numpy as np

from ling_jax.data import batch as batch_keys
from ling_jax.data.corpus import find_text_files, read_text_files, split_documents, stdlib_corpus
from ling_jax.data.packing import PackedRows, pack_documents
from ling_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

Batch = dict[str, np.ndarray]


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Only touched when the caller leaves the process layout to JAX.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process layout: process_index={process_index}, process_count={process_count}")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True, eq=False)
class MixedRows:
    """Several PackedRows of one seq_len as one random-access source (what `TrainIterator` reads):
    rows 0..len(parts[0])-1 are parts[0]'s, then parts[1]'s, and so on."""

    parts: tuple[PackedRows, ...]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("MixedRows needs at least one part")
        lengths = {p.seq_len for p in self.parts}
        if len(lengths) != 1:
            raise ValueError(f"MixedRows parts have different seq_len: {sorted(lengths)}")

    @property
    def seq_len(self) -> int:
        return self.parts[0].seq_len

    @property
    def pad_id(self) -> int:
        return self.parts[0].pad_id

    @property
    def tokens_L(self) -> np.ndarray:
        """Every part's token stream, concatenated (for corpus statistics)."""
        return np.concatenate([p.tokens_L for p in self.parts])

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def part_sizes(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.parts)

    def __len__(self) -> int:
        return sum(self.part_sizes)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return {k: v[0] for k, v in self.batch(np.array([index])).items()}

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at `indices` ([N] ints in [0, len)) as a dict of [N, T] arrays."""
        indices_N = np.asarray(indices, dtype=np.int64)
        ends_P = np.cumsum(self.part_sizes)
        part_N = np.searchsorted(ends_P, indices_N, side="right")
        out = None
        for k, part in enumerate(self.parts):
            take_N = part_N == k
            if not take_N.any():
                continue
            rows = part.batch(indices_N[take_N] - (ends_P[k] - len(part)))
            if out is None:
                out = {key: np.zeros((len(indices_N), *v.shape[1:]), v.dtype) for key, v in rows.items()}
            for key, v in rows.items():
                out[key][take_N] = v
        return out


def passkey_rows(tokenizer, seq_len: int, num_rows: int, seed: int) -> PackedRows:
    """`num_rows` passkey samples, one per row: each T - 1 tokens plus eos, so row r is sample r."""
    from ling_jax.tasks import passkey  # the task imports the model: only when the mix is on

    docs = passkey.training_documents(tokenizer, num_rows, seq_len - 1, seed)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    eos_1 = np.array([tokenizer.eos_id])
    tokens_L = np.concatenate([np.concatenate([d, eos_1]) for d in docs]).astype(dtype)
    pad_id = getattr(tokenizer, "pad_id", None)
    return PackedRows(
        tokens_L=tokens_L,
        doc_starts_D=np.arange(num_rows, dtype=np.int64) * seq_len,
        seq_len=seq_len,
        pad_id=tokenizer.eos_id if pad_id is None else int(pad_id),
    )


def mix_passkey(rows: PackedRows, tokenizer, passkey_fraction: float, seed: int) -> PackedRows | MixedRows:
    """`rows` plus passkey rows making up `passkey_fraction` of the result (see the module docstring)."""
    if not 0.0 <= passkey_fraction < 1.0:
        raise ValueError(f"passkey_fraction must be in [0, 1), got {passkey_fraction}")
    if passkey_fraction == 0.0:
        return rows
    from ling_jax.tasks import passkey

    shortest = passkey.min_length(tokenizer) + 1
    if rows.seq_len < shortest:
        raise ValueError(
            f"a passkey_fraction > 0 needs seq_len >= {shortest} (a passkey sample and eos), got {rows.seq_len}"
        )
    num_passkey = max(1, round(passkey_fraction / (1.0 - passkey_fraction) * len(rows)))
    return MixedRows((rows, passkey_rows(tokenizer, rows.seq_len, num_passkey, seed)))


class TrainIterator:
    """Endless iterator over this process's [B/P, T] share of each shuffled global batch."""

    def __init__(
        self,
        rows: PackedRows | MixedRows,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
        num_threads: int = 2,
        prefetch_buffer_size: int = 4,
    ):
        if len(rows) == 0:
            raise ValueError("cannot iterate over zero rows")
        self.local_batch_size = _local_batch_size(global_batch_size, process_count)
        self._settings = {
            "seed": int(seed),
            "global_batch_size": int(global_batch_size),
            "num_rows": len(rows),
            "seq_len": rows.seq_len,
        }
        self.process_index, self.process_count = process_index, process_count
        dataset = (
            grain.MapDataset.range(len(rows))
            .shuffle(seed=seed)
            .repeat(None, reseed_each_epoch=True)
            .batch(self.local_batch_size, drop_remainder=True)
            .slice(slice(process_index, None, process_count))
            .map(rows.batch)
        )
        read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
        self._iterator = iter(dataset.to_iter_dataset(read_options))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """A JSON-serializable snapshot: where the stream is, and the settings that define it."""
        return {"grain": self._iterator.get_state(), **self._settings}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()` snapshot taken from an iterator over the same stream."""
        mismatched = {k: (state.get(k), v) for k, v in self._settings.items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {s!r} vs current {c!r}" for k, (s, c) in mismatched.items())
            raise ValueError(f"data iterator state does not match this pipeline ({details})")
        self._iterator.set_state(state["grain"])


def make_train_iterator(
    rows: PackedRows | MixedRows,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int = 4,
) -> TrainIterator:
    """Shuffled, endless, resumable train batches; process layout defaults to JAX's."""
    process_index, process_count = _resolve_processes(process_index, process_count)
    return TrainIterator(
        rows,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size,
    )


def make_eval_batches(
    rows: PackedRows, batch_size: int, *, process_index: int | None = None, process_count: int | None = None
) -> Iterator[Batch]:
    """All rows once, in order, as global batches of `batch_size` (this process's share of each).

    Every batch has the full shape [batch_size / process_count, T]: the last global batch is
    filled with filler rows whose loss_mask and segment_ids are 0 (and tokens are `pad_id`), so
    summing loss over loss_mask counts each real target exactly once.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    local_batch_size = _local_batch_size(batch_size, process_count)
    num_rows = len(rows)
    for batch_start in range(0, num_rows, batch_size):
        start = batch_start + process_index * local_batch_size
        indices_N = np.arange(start, start + local_batch_size)
        real_N = indices_N < num_rows
        batch = rows.batch(np.where(real_N, indices_N, 0))
        if not real_N.all():
            filler_N1 = ~real_N[:, None]
            for key in (batch_keys.INPUTS, batch_keys.TARGETS):
                batch[key] = np.where(filler_N1, rows.pad_id, batch[key]).astype(np.int32)
            for key in (batch_keys.SEGMENT_IDS, batch_keys.POSITIONS, batch_keys.LOSS_MASK):
                batch[key] = np.where(filler_N1, 0, batch[key]).astype(batch[key].dtype)
        yield batch


class Datasets(NamedTuple):
    train: PackedRows | MixedRows  # MixedRows with a passkey mix
    heldout: PackedRows | None  # None when heldout_fraction == 0.
    tokenizer: ByteTokenizer | HFTokenizer


def build_datasets(
    source: str,
    tokenizer_spec: str,
    seq_len: int,
    heldout_fraction: float,
    seed: int,
    max_tokens: int | None = None,
    passkey_fraction: float = 0.0,
) -> Datasets:
    """Loads a corpus, splits it by document, packs both parts, and mixes passkey rows into train.

    `source`: "stdlib" (the Python standard library's sources, see `stdlib_corpus`) or a
    .txt/.jsonl file, a directory of them, or a glob. `tokenizer_spec`: see `load_tokenizer`.
    `max_tokens` caps the total packed tokens, split between train and heldout in proportion to
    `heldout_fraction` (passkey rows come on top). `passkey_fraction`: see the module docstring.
    Bad input raises ValueError naming the problem.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (or None), got {max_tokens}")
    if not 0.0 <= passkey_fraction < 1.0:
        raise ValueError(f"passkey_fraction must be in [0, 1), got {passkey_fraction}")
    tokenizer = load_tokenizer(tokenizer_spec)
    docs = stdlib_corpus(seed=seed) if source == "stdlib" else read_text_files(find_text_files(source))
    if not docs:
        raise ValueError(f"corpus {source!r} has no non-empty documents")
    train_docs, heldout_docs = split_documents(docs, heldout_fraction, seed)
    train_budget = heldout_budget = None
    if max_tokens is not None:
        heldout_budget = max(2, math.floor(max_tokens * heldout_fraction)) if heldout_docs else 0
        train_budget = max_tokens - heldout_budget
        if train_budget < 2:
            raise ValueError(f"max_tokens={max_tokens} leaves {train_budget} train tokens after the heldout share")
    train = mix_passkey(
        pack_documents(train_docs, tokenizer, seq_len, max_tokens=train_budget), tokenizer, passkey_fraction, seed
    )
    heldout = None
    if heldout_docs:
        heldout = pack_documents(heldout_docs, tokenizer, seq_len, max_tokens=heldout_budget)
    return Datasets(train=train, heldout=heldout, tokenizer=tokenizer)
