"""Data: tokenizers, corpora, packing into fixed-length rows, and Grain input pipelines."""

from ling_jax.data.corpus import find_text_files, read_text_files, split_documents, stdlib_corpus
from ling_jax.data.packing import PackedRows, pack_documents, tokenize_documents
from ling_jax.data.pipeline import Datasets, TrainIterator, build_datasets, make_eval_batches, make_train_iterator
from ling_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, check_token_ids, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "Datasets",
    "HFTokenizer",
    "PackedRows",
    "Tokenizer",
    "TrainIterator",
    "build_datasets",
    "check_token_ids",
    "find_text_files",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "pack_documents",
    "read_text_files",
    "split_documents",
    "stdlib_corpus",
    "tokenize_documents",
]
