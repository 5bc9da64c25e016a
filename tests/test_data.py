"""Tests for ling_jax.data: tokenizers, corpora, packing, and the Grain pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ling_jax.data import (
    ByteTokenizer,
    HFTokenizer,
    PackedRows,
    build_datasets,
    check_token_ids,
    find_text_files,
    load_tokenizer,
    make_eval_batches,
    make_train_iterator,
    pack_documents,
    read_text_files,
    split_documents,
    stdlib_corpus,
    tokenize_documents,
)

DOCS = [
    "hello world",
    "a",
    "naïve café — 日本語 🙂",
    "a much longer document that will certainly be split across several rows of the packing",
    "",  # Packs as a lone eos.
    "xy",
]


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 258 and tok.eos_id == 256 and tok.pad_id == 257 and tok.bos_id is None
    for text in DOCS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.eos_id] + ids + [tok.pad_id, tok.eos_id]) == text
    # A multi-byte character cut in half decodes with a replacement character, not an error.
    assert tok.decode(tok.encode("é")[:1] + tok.encode("x")) == "\ufffdx"
    with pytest.raises(ValueError, match="258"):
        tok.decode([300])


def _write_tiny_hf_tokenizer(path, specials=("<|endoftext|>", "<pad>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(DOCS * 10, trainer=trainer)
    tok.save(str(path))
    return tok


def test_hf_tokenizer_round_trip(tmp_path):
    raw = _write_tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    for spec in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.eos_id == raw.token_to_id("<|endoftext|>")
        assert tok.pad_id == raw.token_to_id("<pad>")
        assert tok.bos_id is None
        assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
        for text in DOCS:
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert tok.decode(ids + [tok.eos_id]) == text  # Specials are skipped.
        assert tok.encode_batch(DOCS) == [tok.encode(d) for d in DOCS]
    assert HFTokenizer(tmp_path / "tokenizer.json", eos_id=5).eos_id == 5


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        HFTokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="neither 'byte'"):
        load_tokenizer(str(tmp_path / "nope"))
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="bogus.json.*not a valid HF tokenizer"):
        load_tokenizer(str(bogus))
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_tokenizer(str(broken))
    no_eos = tmp_path / "no_eos" / "tokenizer.json"
    no_eos.parent.mkdir()
    _write_tiny_hf_tokenizer(no_eos, specials=("<unk>",))
    with pytest.raises(ValueError, match="pass eos_id"):
        load_tokenizer(str(no_eos))


def test_check_token_ids():
    check_token_ids(np.array([[0, 5], [9, 1]]), 10, what="ok")
    check_token_ids(np.zeros((0,), np.int32), 10, what="empty")
    with pytest.raises(ValueError, match=r"batch: token id 10 at position \(1, 0\).*\[0, 10\)"):
        check_token_ids(np.array([[0, 5], [10, -1]]), 10, what="batch")
    with pytest.raises(ValueError, match=r"token id -3 at position \(2,\)"):
        check_token_ids(np.array([1, 2, -3, 99]), 10, what="x")
    with pytest.raises(ValueError, match="integers"):
        check_token_ids(np.array([1.0]), 10, what="x")


# ---------------------------------------------------------------- corpora


def test_read_text_files_and_jsonl_errors(tmp_path):
    (tmp_path / "a.txt").write_text("doc one\n\nstill doc one")
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n\n{"text": "three", "id": 3}\n')
    (tmp_path / "ignored.md").write_text("not a corpus file")
    paths = find_text_files(tmp_path)
    assert [p.name for p in paths] == ["a.txt", "b.jsonl"]
    assert read_text_files(paths) == ["doc one\n\nstill doc one", "two", "three"]
    assert find_text_files(str(tmp_path / "*.jsonl")) == [tmp_path / "b.jsonl"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_text_files([bad])
    bad.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field 'text'.*body"):
        read_text_files([bad])
    bad.write_text('{"text": 7}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'text' is int"):
        read_text_files([bad])
    bad.write_text('{"body": "custom field"}\n')
    assert read_text_files([bad], text_field="body") == ["custom field"]
    with pytest.raises(ValueError, match="does not exist"):
        read_text_files([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="does not exist"):
        find_text_files(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="matches no files"):
        find_text_files(str(tmp_path / "*.parquet"))


def test_stdlib_corpus_deterministic():
    docs = stdlib_corpus()
    assert len(docs) > 100 and all(d.strip() for d in docs)
    assert any("def " in d for d in docs)
    assert stdlib_corpus() == docs
    subset = stdlib_corpus(max_files=20, seed=1)
    assert len(subset) <= 20 and subset == stdlib_corpus(max_files=20, seed=1)
    assert subset != stdlib_corpus(max_files=20, seed=2)
    assert set(subset) <= set(docs)


def test_split_documents():
    docs = [f"doc {i}" for i in range(50)]
    train, heldout = split_documents(docs, 0.2, seed=0)
    assert len(heldout) == 10 and sorted(train + heldout) == sorted(docs)
    assert not set(train) & set(heldout)
    assert train == [d for d in docs if d in set(train)]  # Input order kept.
    assert (train, heldout) == split_documents(docs, 0.2, seed=0)
    assert heldout != split_documents(docs, 0.2, seed=1)[1]
    assert split_documents(docs[:3], 0.01, seed=0)[1] != []  # At least one heldout document.
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(docs, 1.0, seed=0)


# ---------------------------------------------------------------- packing


def _reference_rows(docs, tok, seq_len):
    """Loop-by-loop reference: stream, per-token document ids, then rows with stride seq_len."""
    stream, doc_of, pos_in_doc = [], [], []
    for d, text in enumerate(docs):
        ids = tok.encode(text) + [tok.eos_id]
        stream += ids
        doc_of += [d] * len(ids)
        pos_in_doc += list(range(len(ids)))
    rows = []
    num_rows = -(-(len(stream) - 1) // seq_len)
    for r in range(num_rows):
        toks, segs, poss = [], [], []
        first_doc = doc_of[r * seq_len]
        for i in range(r * seq_len, r * seq_len + seq_len + 1):
            if i >= len(stream):
                toks.append(tok.pad_id), segs.append(0), poss.append(0)
                continue
            toks.append(stream[i])
            segs.append(doc_of[i] - first_doc + 1)
            poss.append(i - r * seq_len if doc_of[i] == first_doc else pos_in_doc[i])
        mask = [float(segs[t + 1] == segs[t] and segs[t + 1] != 0) for t in range(seq_len)]
        rows.append((toks, segs, poss, mask))
    return stream, rows


@pytest.mark.parametrize("seq_len", [2, 7, 16, 64])
def test_packing_matches_reference_and_invariants(seq_len):
    tok = ByteTokenizer()
    rows = pack_documents(DOCS, tok, seq_len)
    stream, ref = _reference_rows(DOCS, tok, seq_len)
    assert len(rows) == len(ref) and rows.num_tokens == len(stream)
    all_rows = rows.batch(np.arange(len(rows)))
    for key, dtype in [
        ("inputs", np.int32),
        ("targets", np.int32),
        ("segment_ids", np.int32),
        ("positions", np.int32),
        ("loss_mask", np.float32),
    ]:
        assert all_rows[key].shape == (len(rows), seq_len) and all_rows[key].dtype == dtype
    for r, (toks, segs, poss, mask) in enumerate(ref):
        example = rows[r]
        np.testing.assert_array_equal(example["inputs"], toks[:-1])
        np.testing.assert_array_equal(example["targets"], toks[1:])
        np.testing.assert_array_equal(example["segment_ids"], segs[:-1])
        np.testing.assert_array_equal(example["positions"], poss[:-1])
        np.testing.assert_array_equal(example["loss_mask"], mask)
        for key in example:
            np.testing.assert_array_equal(example[key], all_rows[key][r])
    # Inputs tile the stream in order; each row's last target is the next row's first input.
    # (The final eos is also an input, with a padding target, unless the rows end exactly on it.)
    real_inputs = all_rows["inputs"][all_rows["segment_ids"] > 0]
    assert len(real_inputs) - (len(stream) - 1) in (0, 1)
    np.testing.assert_array_equal(real_inputs[: len(stream) - 1], stream[:-1])
    np.testing.assert_array_equal(all_rows["targets"][:-1, -1], all_rows["inputs"][1:, 0])
    # Exactly the within-document transitions are trained: L - (number of documents).
    assert all_rows["loss_mask"].sum() == len(stream) - len(DOCS)
    # Never predict a token of another document or padding; always predict the closing eos.
    eos_target = all_rows["targets"] == tok.eos_id
    assert (all_rows["loss_mask"][eos_target & (all_rows["inputs"] != tok.eos_id)] == 1).all()
    assert (all_rows["loss_mask"][all_rows["inputs"] == tok.eos_id] == 0).all()
    assert (all_rows["loss_mask"][all_rows["targets"] == tok.pad_id] == 0).all()


def test_packing_max_tokens_and_errors():
    tok = ByteTokenizer()
    rows = pack_documents(DOCS, tok, 8, max_tokens=20)
    assert rows.num_tokens == 20
    expected = np.concatenate([tok.encode(d) + [256] for d in DOCS])[:20]
    np.testing.assert_array_equal(rows.tokens_L, expected)
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(DOCS, tok, 1)
    with pytest.raises(ValueError, match="empty corpus"):
        pack_documents([], tok, 8)
    with pytest.raises(IndexError):
        rows[len(rows)]


# ---------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def rows() -> PackedRows:
    # 4 documents of 31 + 1 tokens -> 16 distinct rows of 8 tokens (a row's inputs identify it).
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    docs = ["".join(np.random.default_rng(i).choice(letters, 31)) for i in range(4)]
    packed = pack_documents(docs, ByteTokenizer(), 8)
    assert len(packed) == 16
    assert len(np.unique(packed.batch(np.arange(len(packed)))["inputs"], axis=0)) == len(packed)
    return packed


def _row_ids(batch, rows):
    all_inputs = rows.batch(np.arange(len(rows)))["inputs"]
    return [int(np.flatnonzero((all_inputs == x).all(axis=1))[0]) for x in batch["inputs"]]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_iterator_deterministic_and_reshuffles(rows):
    n = len(rows)
    kwargs = dict(global_batch_size=4, process_index=0, process_count=1)
    first = _take(make_train_iterator(rows, seed=3, **kwargs), 2 * n // 4)
    _assert_same_batches(first, _take(make_train_iterator(rows, seed=3, **kwargs), 2 * n // 4))
    other = _take(make_train_iterator(rows, seed=4, **kwargs), 2 * n // 4)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(first, other))
    order = [i for b in first for i in _row_ids(b, rows)]
    epoch_1, epoch_2 = order[:n], order[n:]
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(n))  # Each epoch sees every row once.
    assert epoch_1 != epoch_2 and epoch_1 != list(range(n))  # Shuffled, and reshuffled per epoch.
    assert first[0]["inputs"].shape == (4, rows.seq_len)


def test_train_iterator_process_sharding(rows):
    steps = 6
    full = _take(make_train_iterator(rows, global_batch_size=4, seed=0, process_index=0, process_count=1), steps)
    shards = [
        _take(make_train_iterator(rows, global_batch_size=4, seed=0, process_index=p, process_count=2), steps)
        for p in range(2)
    ]
    for g in range(steps):
        ids_0, ids_1 = _row_ids(shards[0][g], rows), _row_ids(shards[1][g], rows)
        assert len(ids_0) == len(ids_1) == 2
        assert not set(ids_0) & set(ids_1)
        assert ids_0 + ids_1 == _row_ids(full[g], rows)
        for key in full[g]:
            np.testing.assert_array_equal(np.concatenate([shards[0][g][key], shards[1][g][key]]), full[g][key])
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_train_iterator(rows, global_batch_size=5, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize("k, m", [(3, 4), (5, 9)])  # The second crosses epoch boundaries.
def test_train_iterator_resume(rows, k, m):
    def fresh(**kw):
        kw = dict(global_batch_size=4, seed=7, process_index=0, process_count=1) | kw
        return make_train_iterator(rows, **kw)

    iterator = fresh()
    _take(iterator, k)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, m)
    resumed = fresh()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, m), expected)
    # The same state restores onto two processes: each gets its half of the same global batches.
    halves = []
    for p in range(2):
        it = fresh(process_index=p, process_count=2)
        it.set_state(state)
        halves.append(_take(it, m))
    for g in range(m):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][g]["inputs"], halves[1][g]["inputs"]]), expected[g]["inputs"]
        )
    with pytest.raises(ValueError, match="seed: saved 7 vs current 8"):
        fresh(seed=8).set_state(state)


def test_eval_batches(rows):
    batches = list(make_eval_batches(rows, 6, process_index=0, process_count=1))
    assert len(batches) == -(-len(rows) // 6)
    assert all(b["inputs"].shape == (6, rows.seq_len) for b in batches)
    everything = rows.batch(np.arange(len(rows)))
    for key in everything:
        np.testing.assert_array_equal(np.concatenate([b[key] for b in batches])[: len(rows)], everything[key])
    filler = len(batches) * 6 - len(rows)
    assert filler > 0 and (batches[-1]["loss_mask"][-filler:] == 0).all()
    assert sum(b["loss_mask"].sum() for b in batches) == everything["loss_mask"].sum()
    sharded = [list(make_eval_batches(rows, 6, process_index=p, process_count=2)) for p in range(2)]
    for g, batch in enumerate(batches):
        np.testing.assert_array_equal(
            np.concatenate([sharded[0][g]["inputs"], sharded[1][g]["inputs"]]), batch["inputs"]
        )


def test_build_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("first document " * 20)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 10}) for i in range(9)))
    data = build_datasets(str(tmp_path), "byte", 16, 0.2, seed=0, max_tokens=None)
    assert isinstance(data.tokenizer, ByteTokenizer)
    assert data.train.num_documents + data.heldout.num_documents == 10
    assert data.heldout.num_documents == 2 and data.train.seq_len == 16
    again = build_datasets(str(tmp_path), "byte", 16, 0.2, seed=0, max_tokens=None)
    np.testing.assert_array_equal(again.train.tokens_L, data.train.tokens_L)
    capped = build_datasets("stdlib", "byte", 32, 0.1, seed=0, max_tokens=10_000)
    assert capped.train.num_tokens == 9_000 and capped.heldout.num_tokens == 1_000

    with pytest.raises(ValueError, match="does not exist"):
        build_datasets(str(tmp_path / "missing.jsonl"), "byte", 16, 0.1, 0, None)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        build_datasets(str(tmp_path), "byte", 1, 0.1, 0, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        build_datasets(str(empty), "byte", 16, 0.1, 0, None)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_passkey_mix(tmp_path, fraction):
    """data.passkey_fraction: that share of the train rows are passkey samples, one per row (the
    needle and the question always in the row), every row once per epoch; held-out stays corpus."""
    from ling_jax.data.pipeline import MixedRows

    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 60)
    T = 128
    plain = build_datasets(str(tmp_path), "byte", T, 0.2, seed=0)
    data = build_datasets(str(tmp_path), "byte", T, 0.2, seed=0, passkey_fraction=fraction)
    assert isinstance(data.train, MixedRows) and isinstance(data.heldout, PackedRows)
    corpus, mixed = data.train.parts
    np.testing.assert_array_equal(corpus.tokens_L, plain.train.tokens_L)
    np.testing.assert_array_equal(data.heldout.tokens_L, plain.heldout.tokens_L)
    assert len(mixed) == round(fraction / (1 - fraction) * len(corpus))
    assert abs(len(mixed) / len(data.train) - fraction) <= 1 / len(data.train)

    tok = ByteTokenizer()
    batch = data.train.batch(np.arange(len(data.train)))
    for key in batch:  # the mix's rows are its parts' rows, in order
        np.testing.assert_array_equal(batch[key][: len(corpus)], corpus.batch(np.arange(len(corpus)))[key])
        np.testing.assert_array_equal(batch[key][len(corpus) :], mixed.batch(np.arange(len(mixed)))[key])
    for r in range(len(corpus), len(data.train)):
        text = tok.decode(batch["inputs"][r])
        assert text.count("Remember it.") == 1 and text.endswith("What is the pass key? The pass key is " + text[-5:])
        assert batch["inputs"][r, -1] == tok.eos_id  # the sample, then its eos: exactly one row
        np.testing.assert_array_equal(batch["positions"][r], np.arange(T))
        np.testing.assert_array_equal(batch["segment_ids"][r], np.ones(T))
        assert batch["loss_mask"][r, :-1].all() and batch["loss_mask"][r, -1] == 0  # eos -> next row: masked
        key = text.rsplit("The pass key is ", 1)[1]
        assert key.isdigit() and tok.decode(batch["targets"][r, -7:-1]) == key[-6:]
    assert all("pass key" not in tok.decode(row) for row in batch["inputs"][: len(corpus)])

    iterator = make_train_iterator(data.train, global_batch_size=2, seed=0, process_index=0, process_count=1)
    seen = np.concatenate([next(iterator)["inputs"] for _ in range(len(data.train) // 2)])
    is_passkey = np.array([b"pass key" in bytes(row[row < 256].astype(np.uint8)) for row in seen])
    assert is_passkey.sum() == len(mixed) if len(data.train) % 2 == 0 else abs(is_passkey.sum() - len(mixed)) <= 1

    again = build_datasets(str(tmp_path), "byte", T, 0.2, seed=0, passkey_fraction=fraction)
    np.testing.assert_array_equal(again.train.parts[1].tokens_L, mixed.tokens_L)


def test_passkey_mix_errors(tmp_path):
    from ling_jax.config import ConfigError
    from ling_jax.train.config import DataConfig

    (tmp_path / "a.txt").write_text("some text " * 50)
    with pytest.raises(ValueError, match=r"passkey_fraction must be in \[0, 1\), got 1.0"):
        build_datasets(str(tmp_path), "byte", 128, 0.0, 0, passkey_fraction=1.0)
    with pytest.raises(ValueError, match="a passkey_fraction > 0 needs seq_len >= 82"):
        build_datasets(str(tmp_path), "byte", 64, 0.0, 0, passkey_fraction=0.1)
    with pytest.raises(ConfigError, match="data.passkey_fraction"):
        DataConfig(passkey_fraction=-0.1)
    assert isinstance(build_datasets(str(tmp_path), "byte", 64, 0.0, 0, passkey_fraction=0.0).train, PackedRows)


def test_train_iterator_state_in_orbax_checkpoint(rows, tmp_path):
    import orbax.checkpoint as ocp

    iterator = make_train_iterator(rows, global_batch_size=4, seed=1, process_index=0, process_count=1)
    _take(iterator, 5)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(data=ocp.args.JsonSave(iterator.get_state())))
    manager.wait_until_finished()
    expected = _take(iterator, 3)
    restored = manager.restore(5, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    resumed = make_train_iterator(rows, global_batch_size=4, seed=1, process_index=0, process_count=1)
    resumed.set_state(restored)
    _assert_same_batches(_take(resumed, 3), expected)


@pytest.mark.parametrize(
    "bad_id, shown",
    [(65541, "65541"), (-1, "-1"), (1.7, "integers")],  # 65541 would wrap to id 5 in the uint16 stream
)
def test_tokenized_corpus_ids_are_checked_before_packing(bad_id, shown):
    class Broken:  # a tokenizer that emits one id outside its own vocabulary
        vocab_size, eos_id, bos_id = 60000, 0, None

        def encode(self, text):
            return [3, bad_id] if text == "bad" else [3, 4]

        def decode(self, ids):
            return ""

    with pytest.raises(ValueError, match=rf"tokenizer output for document 1: .*{shown}"):
        tokenize_documents(["fine", "bad"], Broken())
