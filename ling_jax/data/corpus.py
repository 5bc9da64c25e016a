"""Text corpora as lists of documents (one `str` per document).

- `stdlib_corpus`: the Python standard library's own `.py` sources, found at run time; the
  default corpus, always available without a download.
- `find_text_files` + `read_text_files`: user corpora of `.txt` files (one document per file) and
  `.jsonl` files (one document per line, taken from a JSON field, "text" by default).
- `split_documents`: a deterministic document-level train / heldout split.

Empty (whitespace-only) documents are dropped everywhere: they would only contribute an eos.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".jsonl")


def stdlib_corpus(max_files: int | None = None, seed: int = 0, *, include_tests: bool = False) -> list[str]:
    """Returns the text of the Python standard library's `.py` files, one document per file.

    Files are found under `sysconfig.get_paths()["stdlib"]`, skipping `site-packages` and
    `__pycache__` (and `test` / `tests` directories unless `include_tests`), unreadable files and
    files that are not valid UTF-8. Documents come in sorted path order. With `max_files`, a
    subset of that many files is drawn with `seed` (still returned in sorted path order). The
    result is deterministic for a given Python installation, not across Python versions.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped_dirs = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skipped_dirs |= {"test", "tests"}
    paths = sorted(p for p in root.rglob("*.py") if not skipped_dirs & set(p.relative_to(root).parts[:-1]))
    if max_files is not None:
        if max_files < 1:
            raise ValueError(f"stdlib_corpus: max_files must be >= 1, got {max_files}")
        if max_files < len(paths):
            chosen = np.random.default_rng(seed).choice(len(paths), size=max_files, replace=False)
            paths = [paths[i] for i in sorted(chosen)]
    docs = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(text)
    if not docs:
        raise ValueError(f"stdlib_corpus: no readable .py files found under {root}")
    return docs


def find_text_files(source: str | os.PathLike) -> list[Path]:
    """Resolves a file, a directory (searched recursively) or a glob to sorted .txt/.jsonl paths."""
    source = str(source)
    path = Path(source)
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(source):
        candidates = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not candidates:
            raise ValueError(f"corpus glob {source!r} matches no files")
    else:
        raise ValueError(f"corpus source {source!r} does not exist (expected a file, directory or glob)")
    paths = [p for p in candidates if p.suffix in TEXT_SUFFIXES]
    if path.is_file() and not paths:
        raise ValueError(f"corpus file {source!r} is neither .txt nor .jsonl")
    if not paths:
        raise ValueError(f"corpus source {source!r} contains no .txt or .jsonl files")
    return paths


def read_text_files(paths: Iterable[str | os.PathLike], *, text_field: str = "text") -> list[str]:
    """Reads documents: a `.txt` file is one document; each line of a `.jsonl` file is one.

    For `.jsonl`, each non-blank line must be a JSON object whose `text_field` is a string; errors
    name the file and the 1-based line number. Missing files, other suffixes and files that are not
    UTF-8 raise ValueError naming the file.
    """
    docs: list[str] = []
    for path in map(Path, paths):
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"corpus file {str(path)!r} is neither .txt nor .jsonl")
        if not path.is_file():
            raise ValueError(f"corpus file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {str(path)!r} is not valid UTF-8: {e}") from e
        if path.suffix == ".txt":
            docs.append(text)
        else:
            docs.extend(_parse_jsonl(text, path, text_field))
    return [d for d in docs if d.strip()]


def _parse_jsonl(text: str, path: Path, text_field: str) -> list[str]:
    docs = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise ValueError(f"{where}: missing field {text_field!r} (fields present: {sorted(record)})")
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string")
        docs.append(value)
    return docs


def split_documents(docs: Sequence[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Splits documents into (train, heldout), deterministically given `seed`.

    round(heldout_fraction * len(docs)) documents, at least one when the fraction is positive and
    never all of them, are drawn at random for heldout. Both lists keep the input order.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    num_docs = len(docs)
    if num_docs == 0:
        raise ValueError("split_documents: the corpus has no documents")
    num_heldout = int(round(heldout_fraction * num_docs))
    if heldout_fraction > 0:
        if num_docs < 2:
            raise ValueError(
                f"split_documents: heldout_fraction={heldout_fraction} needs at least 2 documents, "
                f"the corpus has {num_docs}"
            )
        num_heldout = min(max(num_heldout, 1), num_docs - 1)
    heldout_mask_D = np.zeros(num_docs, dtype=bool)
    heldout_mask_D[np.random.default_rng(seed).permutation(num_docs)[:num_heldout]] = True
    train = [d for d, held in zip(docs, heldout_mask_D) if not held]
    heldout = [d for d, held in zip(docs, heldout_mask_D) if held]
    return train, heldout
