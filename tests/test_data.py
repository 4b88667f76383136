"""Corpora: sources, JSONL, the .bin format, packing, the split and the training order."""

import json

import numpy as np
import pytest

import bmojo.data
from bmojo.data import (
    Corpus,
    check_token_ids,
    batch_positions,
    load_corpus,
    read_documents,
    read_token_file,
    source_files,
    stdlib_files,
    write_token_file,
)
from bmojo.errors import BMojoError
from bmojo.tokenization import ByteTokenizer


def test_folders_are_read_recursively_in_order_without_hidden_files(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.txt", "sub/d.md", ".hidden/e.txt", ".f.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    names = [p.relative_to(tmp_path).as_posix() for p in source_files(str(tmp_path))]
    assert names == ["a.txt", "b.txt", "sub/c.txt", "sub/d.md"]
    assert [p.name for p in source_files(str(tmp_path), "*.txt")] == ["a.txt", "b.txt", "c.txt"]


def test_stdlib_is_python_files_without_site_packages():
    files = stdlib_files()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    assert any(p.name == "functools.py" for p in files)


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(BMojoError, match=r"^data path '.*nope' does not exist$"):
        source_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BMojoError, match=r"^data folder '.*empty' holds no files matching '\*'$"):
        source_files(str(tmp_path / "empty"))
    (tmp_path / "empty" / "blank.txt").write_bytes(b"")
    with pytest.raises(BMojoError, match=r"holds no text \(all files are empty\)"):
        load_corpus([str(tmp_path / "empty")], ByteTokenizer(), 8, 0.1)


def test_jsonl_records_are_documents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"body": "x", "text": "two"}) + "\n")
    assert list(read_documents([path])) == ["héllo".encode(), b"two"]
    path.write_text(json.dumps({"body": "x"}) + "\n")
    assert list(read_documents([path], text_key="body")) == [b"x"]
    with pytest.raises(BMojoError, match=r"d.jsonl:1: expected a JSON object with a string field 'text'"):
        list(read_documents([path]))
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(BMojoError, match=r"d.jsonl:2: not valid JSON"):
        list(read_documents([path]))


def test_documents_are_packed_with_end_of_document_tokens(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "b.txt").write_bytes(b"de\xff")  # invalid UTF-8: the byte tokenizer keeps the byte
    corpus = load_corpus([str(tmp_path)], ByteTokenizer(), seq_len=2, val_fraction=0.25)
    eos = 2
    assert corpus.tokens.tolist() == [97 + 4, 98 + 4, 99 + 4, eos, 100 + 4, 101 + 4, 255 + 4, eos]
    windows = np.array([0, 3])
    assert corpus.batch(windows).tolist() == [corpus.tokens[0:2].tolist(), corpus.tokens[6:8].tolist()]


def test_split_is_deterministic_disjoint_and_complete():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Corpus(tokens, 10, 0.1), Corpus(tokens, 10, 0.1)
    assert np.array_equal(a.val_windows, b.val_windows) and np.array_equal(a.train_windows, b.train_windows)
    assert len(a.val_windows) == 10 and len(a.train_windows) == 90
    assert sorted(np.concatenate([a.val_windows, a.train_windows]).tolist()) == list(range(100))
    assert a.val_windows.max() - a.val_windows.min() > 50  # spread over the corpus, not its tail
    assert not np.array_equal(a.val_windows, np.sort(a.val_windows))  # random order: any prefix is a fair sample
    tiny = Corpus(tokens[:25], 10, 0.01)
    assert len(tiny.val_windows) == 1 and len(tiny.train_windows) == 1  # at least one of each
    with pytest.raises(BMojoError, match=r"has 19 tokens, too few for seq_len 10: need at least 20"):
        Corpus(tokens[:19], 10, 0.1)


def test_training_order_is_a_pure_function_of_seed_and_step():
    n, batch = 10, 4
    first = [batch_positions(0, step, batch, n) for step in range(5)]  # 20 samples: two epochs
    assert np.array_equal(batch_positions(0, 3, batch, n), first[3])  # recomputed out of order
    flat = np.concatenate(first)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # each epoch is reshuffled
    assert not np.array_equal(np.concatenate([batch_positions(1, s, batch, n) for s in range(5)]), flat)


def test_token_file_round_trip_and_dtype(tmp_path):
    chunks = [np.array([1, 2, 3]), np.array([65535, 0])]
    assert write_token_file(tmp_path / "a.bin", iter(chunks), vocab_size=65536) == 5
    tokens, header = read_token_file(tmp_path / "a.bin")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == [1, 2, 3, 65535, 0]
    assert header == {"format": "bmojo-tokens", "version": 1, "dtype": "uint16", "vocab_size": 65536, "num_tokens": 5}
    write_token_file(tmp_path / "b.bin", iter([np.array([70000])]), vocab_size=70001)
    assert read_token_file(tmp_path / "b.bin")[0].dtype == np.uint32
    assert (tmp_path / "b.bin").stat().st_size == 4


def test_token_file_corpus_is_memory_mapped_and_checked(tmp_path):
    tok = ByteTokenizer()
    write_token_file(tmp_path / "c.bin", iter([np.arange(100) % 260]), vocab_size=tok.vocab_size)
    corpus = load_corpus([str(tmp_path / "c.bin")], tok, seq_len=10, val_fraction=0.1)
    assert isinstance(corpus.tokens, np.memmap)
    assert corpus.batch(np.array([2])).tolist() == [list(range(20, 30))]
    write_token_file(tmp_path / "d.bin", iter([np.arange(100)]), vocab_size=300)
    with pytest.raises(
        BMojoError, match=r"d.bin was tokenized with a vocabulary of 300 tokens, but the tokenizer has 260"
    ):
        load_corpus([str(tmp_path / "d.bin")], tok, 10, 0.1)
    with pytest.raises(BMojoError, match=r"a pre-tokenized .bin corpus must be the only data source"):
        load_corpus([str(tmp_path / "c.bin"), str(tmp_path / "d.bin")], tok, 10, 0.1)


def test_broken_token_files_are_clear_errors(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0" * 6)
    with pytest.raises(BMojoError, match=r"x.bin: missing header x.bin.json"):
        read_token_file(tmp_path / "x.bin")
    header = {"format": "bmojo-tokens", "dtype": "uint16", "num_tokens": 4, "vocab_size": 260}
    (tmp_path / "x.bin.json").write_text(json.dumps(header))
    with pytest.raises(BMojoError, match=r"x.bin: 6 bytes, but the header promises 4 uint16 tokens"):
        read_token_file(tmp_path / "x.bin")
    for broken in ("{", json.dumps({**header, "num_tokens": None}), "[]"):
        (tmp_path / "x.bin.json").write_text(broken)
        with pytest.raises(BMojoError, match=r"x.bin.json: not a bmojo-tokens header"):
            read_token_file(tmp_path / "x.bin")


def test_jsonl_with_a_byte_order_mark_reads_like_without(tmp_path):
    records = json.dumps({"text": "héllo"}) + "\n" + json.dumps({"text": "two"}) + "\n"
    (tmp_path / "plain.jsonl").write_text(records, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(records, encoding="utf-8-sig")
    assert (tmp_path / "bom.jsonl").read_bytes().startswith(b"\xef\xbb\xbf")
    plain = list(read_documents([tmp_path / "plain.jsonl"]))
    assert plain == ["héllo".encode(), b"two"]
    assert list(read_documents([tmp_path / "bom.jsonl"])) == plain


def test_unreadable_data_files_are_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pathlib.Path.read_bytes", denied)
    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(BMojoError, match=r"^cannot read data file '.*a.txt': Permission denied$"):
        list(read_documents([tmp_path / "a.txt"]))
    with pytest.raises(BMojoError, match=r"^cannot read data file '.*b.jsonl': Permission denied$"):
        list(read_documents([tmp_path / "b.jsonl"]))


@pytest.mark.parametrize("chunk", [7, 1 << 24])
def test_token_ids_are_checked_slice_by_slice(chunk, tmp_path, monkeypatch):
    monkeypatch.setattr(bmojo.data, "_CHECK_CHUNK", chunk)
    tokens = np.arange(50, dtype=np.uint16) % 10
    check_token_ids(tokens, 10, "t")  # all below 10
    tokens[[12, 40]] = [10, 17]  # two bad ids in different slices: the message names the largest and the first
    with pytest.raises(BMojoError, match=r"^t: holds token id 17 \(the first out-of-range one at token 12\), but the "
                       r"vocabulary has 10 tokens \(ids 0\.\.9\)"):  # fmt: skip
        check_token_ids(tokens, 10, "t")
    write_token_file(tmp_path / "t.bin", iter([tokens]), vocab_size=10)
    with pytest.raises(BMojoError, match=r"t.bin: holds token id 17 \(the first out-of-range one at token 12\)"):
        read_token_file(tmp_path / "t.bin")


def test_a_failed_write_leaves_the_old_token_file(tmp_path):
    write_token_file(tmp_path / "c.bin", iter([np.arange(5)]), vocab_size=260)
    before = (tmp_path / "c.bin").read_bytes(), (tmp_path / "c.bin.json").read_text()

    def chunks():
        yield np.arange(3)
        raise BMojoError("stop")

    with pytest.raises(BMojoError, match="stop"):
        write_token_file(tmp_path / "c.bin", chunks(), vocab_size=260)
    assert ((tmp_path / "c.bin").read_bytes(), (tmp_path / "c.bin.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.bin.json"]  # no temporary file left
