"""Sharing a run: `bmojo export` writes a directory that transformers' Auto classes load (model and tokenizer,
the byte-level one included), and `bmojo generate` streams the tokens as they come."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bmojo
from bmojo.checkpoint import load_model, resolve_checkpoint
from bmojo.cli import main
from bmojo.export import bytes_to_unicode
from bmojo.tokenization import ByteTokenizer, load_tokenizer
from bmojo.evaluation import generate_text

WORDS = ["def", "return", "self", "import", "class", "if", "(x)", ":", "\n    ", "héllo", "🙂"]
TEXTS = [
    "def f(x):\n    return x  # ünïcödé 🙂",
    "<eos><pad> literal special names <bos><unk>",  # text, as when bmojo encodes data
    "\x00\x7f tabs\tand\r\nnewlines",
    "",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny byte-level run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("export")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    (root / "corpus" / "a.py").write_text("".join(rng.choice(WORDS) + " " for _ in range(2000)))
    args = ["train", "--preset", "tiny", "--data", str(root / "corpus"), "--out", str(root / "run"), "--steps", "4",
            "--save-every", "2", "--seq-len", "32", "--batch-size", "4", "--threads", "1", "--lr", "3e-3",
            "--warmup-steps", "1", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=4"]  # fmt: skip
    assert main(args) == 0
    return root / "run"


def random_texts(n: int, seed: int = 0) -> list[str]:
    """ASCII and any other code point but the surrogates (which are not text and UTF-8 cannot encode)."""
    rng = random.Random(seed)
    points = [*range(0, 0xD800), *range(0xE000, 0x30000)]
    return ["".join(chr(rng.choice([rng.randrange(32, 127), rng.choice(points)])) for _ in range(40)) for _ in range(n)]


def assert_same_model(exported: Path, checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=False)
    assert type(model) is bmojo.BMojoForCausalLM
    reference = load_model(checkpoint)
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


def test_byte_run_exports_to_the_auto_classes(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "step_000004" in capsys.readouterr().out
    assert not list(out.rglob("*.py"))  # nothing to trust: no code travels
    assert_same_model(out, resolve_checkpoint(run))

    hf = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    mine = ByteTokenizer()
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    for text in TEXTS + random_texts(20):
        assert hf(text)["input_ids"] == mine.encode(text), text
    # Every id the model can emit (specials and the vocabulary's padding ids too), in random orders: invalid
    # UTF-8 decodes to U+FFFD as ByteTokenizer.decode does.
    rng = random.Random(1)
    single = [[i] for i in range(264)]
    sequences = [[rng.randrange(264) for _ in range(rng.randrange(1, 30))] for _ in range(300)]
    utf8 = [mine.encode(text) for text in random_texts(20, seed=2)]
    for ids in single + sequences + utf8:
        assert hf.decode(ids, skip_special_tokens=True) == mine.decode(ids), ids


def test_the_byte_map_is_the_one_tokenizers_uses():
    from tokenizers import pre_tokenizers

    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert sorted(mapping.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_bpe_tokenizer_and_an_older_checkpoint(run, tmp_path):
    tok_dir = tmp_path / "bpe"
    corpus = run.parent / "corpus"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "264", "--out", str(tok_dir)]) == 0
    out = tmp_path / "exported"
    args = ["export", str(run), "--out", str(out), "--checkpoint", "2", "--tokenizer", str(tok_dir)]
    assert main(args) == 0
    assert_same_model(out, run / "checkpoints" / "step_000002")
    hf = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    mine = load_tokenizer(tok_dir)
    assert hf.eos_token_id == mine.eos_id == 2
    for text in TEXTS + random_texts(20):
        ids = mine.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == mine.decode(ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "3"], "--checkpoint '3' is not a checkpoint of '{run}' (its steps: 2, 4)"),
        (["--out", "{file}"], "--out '{file}' exists and is not an empty directory"),
        (["--out", "{file}/sub/dir"], "cannot write '{file}/sub/dir': '{file}' is not a directory"),
        (["--tokenizer", "{missing}"], "tokenizer '{missing}' not found: give 'byte', a tokenizer.json file or a "
         "tokenizer directory"),
    ],
)  # fmt: skip
def test_export_errors_are_one_line(run, tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    names = {"run": run, "file": tmp_path / "file", "missing": tmp_path / "missing"}
    args = [a.format(**names) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(["export", str(run), *args]) == 2
    assert capsys.readouterr().err == f"bmojo: error: {message.format(**names)}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # nothing half-written


def test_generate_streams_tokens_as_they_come(run, monkeypatch):
    calls = []
    forward = bmojo.BMojoForCausalLM.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    class Recorder:
        """stdout that notes how many forward passes had run at each write."""

        def __init__(self):
            self.writes: list[tuple[str, int]] = []

        def write(self, text):
            if text:
                self.writes.append((text, len(calls)))
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(bmojo.BMojoForCausalLM, "forward", counting_forward)
    recorder = Recorder()
    monkeypatch.setattr("sys.stdout", recorder)
    args = ["generate", str(run), "--prompt", "def ", "--max-new-tokens", "24", "--seed", "3", "--threads", "1"]
    assert main(args) == 0
    monkeypatch.undo()

    total = len(calls)
    pieces = [(text, n) for text, n in recorder.writes if text not in ("def ", "\n")]
    assert len({n for _, n in pieces}) > 1  # written at several points of the generation ...
    assert pieces[0][1] < total  # ... the first long before its end
    model = load_model(resolve_checkpoint(run))
    expected = generate_text(model, ByteTokenizer(), "def ", 24, 0.8, 50, 3)
    assert "".join(text for text, _ in recorder.writes) == expected + "\n"
