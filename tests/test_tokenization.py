"""Tokenizers: byte-level, BPE trained with `tokenizers`, foreign tokenizer.json files and directories."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from bmojo.errors import BMojoError
from bmojo.tokenization import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

TEXT = "def héllo(name):\n    return f'hi {name}' # ünïcode ✓\n"
CORPUS = [(TEXT * 3).encode(), b"import os\nprint(os.getcwd())\n" * 5, "naïve café résumé\n".encode() * 4]


def test_byte_tokenizer_ids_are_bytes_after_the_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 == len(SPECIAL_TOKENS) + 256
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.encode("A\n") == [ord("A") + 4, ord("\n") + 4]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.tokens(tok.encode("a\n") + [2]) == ["a", "\\n", "<eos>"]


def test_byte_tokenizer_reads_raw_bytes_and_ends_documents():
    docs = list(ByteTokenizer().encode_documents([b"ab", b"\xff\xfe"]))  # \xff\xfe is not UTF-8: kept as bytes
    assert [d.tolist() for d in docs] == [[97 + 4, 98 + 4, 2], [255 + 4, 254 + 4, 2]]


def test_byte_decode_skips_specials_and_ids_past_the_vocabulary():
    tok = ByteTokenizer()
    # A model's vocab_size may be rounded up (264): ids 260..263 decode to nothing.
    assert tok.decode([2, 104 + 4, 260, 263, 105 + 4, 0]) == "hi"
    assert tok.decode([0xC3 + 4]) == "\ufffd"  # a cut multi-byte character is replaced, not an error


def test_byte_tokenizer_saves_and_loads(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


def test_bpe_has_the_specials_first_and_round_trips(bpe):
    assert 260 < bpe.vocab_size <= 300
    assert [bpe.tokenizer.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    ids = bpe.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert bpe.decode(ids) == TEXT


def test_bpe_treats_special_token_text_in_data_as_text(bpe):
    ids = bpe.encode("<eos>")
    assert 2 not in ids and bpe.decode(ids) == "<eos>"


def test_bpe_replaces_undecodable_bytes(bpe):
    [ids] = bpe.encode_documents([b"ab\xffcd"])
    assert ids.tolist() == bpe.encode("ab\ufffdcd") + [2]


def test_bpe_saves_loads_and_is_a_transformers_tokenizer(bpe, tmp_path):
    from transformers import AutoTokenizer

    bpe.save(tmp_path / "bpe")
    loaded = load_tokenizer(tmp_path / "bpe")
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (bpe.vocab_size, 2, 0)
    assert loaded.encode(TEXT) == bpe.encode(TEXT)
    hf = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert hf.eos_token_id == 2 and hf(TEXT)["input_ids"] == bpe.encode(TEXT)


def test_bare_tokenizer_json_finds_its_end_of_text_token(tmp_path):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.eos_id == tok.token_to_id("<|endoftext|>") == 0
    assert load_tokenizer(tmp_path).eos_id == 0  # the directory holding it


def test_bpe_vocab_must_hold_bytes_and_specials():
    with pytest.raises(BMojoError, match=r"vocab size must be at least 260 \(256 bytes \+ 4 special tokens\), got 100"):
        train_bpe(CORPUS, vocab_size=100)


def test_bad_tokenizer_paths_are_clear_errors(tmp_path):
    with pytest.raises(
        BMojoError, match="tokenizer 'nope' not found: give 'byte', a tokenizer.json file or a tokenizer directory"
    ):
        load_tokenizer("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BMojoError, match=r"cannot load a tokenizer from '.*empty'"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(BMojoError, match=r"cannot load a tokenizer from '.*broken.json'"):
        load_tokenizer(tmp_path / "broken.json")


def test_encode_documents_agrees_with_encode(bpe):
    docs = [d.decode() for d in CORPUS]
    out = list(bpe.encode_documents([d.encode() for d in docs], batch_size=2))
    assert [o.tolist() for o in out] == [bpe.encode(d) + [2] for d in docs]
    assert all(o.dtype == np.int32 for o in out)


def test_fingerprint_is_equal_exactly_for_the_same_ids(bpe, tmp_path):
    bpe.save(tmp_path / "bpe")
    same = [load_tokenizer(tmp_path / "bpe"), load_tokenizer(tmp_path / "bpe" / "tokenizer.json")]
    # the bare tokenizer.json finds <eos> (id 2) by name, as the directory's config names it
    assert {t.fingerprint() for t in same} == {bpe.fingerprint()}
    assert all(t.encode(TEXT) == bpe.encode(TEXT) for t in same)
    other = train_bpe([b"completely different text, other merges " * 20], vocab_size=bpe.vocab_size)
    assert other.fingerprint() != bpe.fingerprint()
    no_eos = HFTokenizer(bpe.tokenizer, pad_id=0, bos_id=1, eos_id=None)  # documents end differently
    assert no_eos.fingerprint() != bpe.fingerprint()
    assert ByteTokenizer().fingerprint() == load_tokenizer("byte").fingerprint() != bpe.fingerprint()
    assert train_bpe(CORPUS, 260).vocab_size == ByteTokenizer().vocab_size  # same size, other ids:
    assert train_bpe(CORPUS, 260).fingerprint() != ByteTokenizer().fingerprint()


def test_a_tokenizer_directory_that_names_python_code_is_refused(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "X", "auto_map": {"AutoTokenizer": ["x.X", "x.X"]}})
    )
    with pytest.raises(BMojoError, match=r"its auto_map names Python code, which bmojo never runs"):
        load_tokenizer(tmp_path / "tok")
