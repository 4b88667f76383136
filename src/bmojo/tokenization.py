"""Tokenizers: byte-level (the default, nothing to download or train), BPE trained locally with the `tokenizers`
library, or any local ``tokenizer.json`` / Hugging Face tokenizer directory.

Both kinds share one small interface: ``vocab_size``, ``pad_id``/``bos_id``/``eos_id`` (``eos_id`` may be None
for a foreign tokenizer without one), ``encode(text)``, ``encode_documents(docs)``, ``decode(ids)``,
``tokens(ids)`` and ``save(directory)``; ``load_tokenizer`` reads back whatever ``save`` wrote.

Loading never runs code from a tokenizer directory: transformers is called with ``trust_remote_code=False``; a
directory with a ``tokenizer.json`` loads through ``PreTrainedTokenizerFast``, which ignores an ``auto_map``, and
one without it whose configuration has an ``auto_map`` is refused before transformers sees it.

Documents arrive as raw bytes. The byte-level tokenizer encodes them as they are, so no input is ever
undecodable; the other tokenizers work on text and decode bytes as UTF-8 with ``errors="replace"`` (an
undecodable byte becomes U+FFFD) rather than skipping the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import BMojoError

# The tokenizers made here put these first, so ids 0/1/2 match BMojoConfig's default pad/bos/eos ids.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
# Names that end a document in common tokenizers, for a bare tokenizer.json that does not say which one it uses.
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")


class ByteTokenizer:
    """Token ``len(SPECIAL_TOKENS) + b`` is byte ``b``: a vocabulary of 260 (the "cpu" preset's 264 holds it)."""

    offset = len(SPECIAL_TOKENS)
    vocab_size = offset + 256
    pad_id, bos_id, eos_id = 0, 1, 2
    description = "byte-level (raw bytes, no decoding)"

    def encode(self, text: str) -> list[int]:
        # surrogateescape: text from the command line that was not valid UTF-8 encodes to its original bytes
        data = text.encode("utf-8", errors="surrogateescape")
        return (np.frombuffer(data, dtype=np.uint8).astype(np.int64) + self.offset).tolist()

    def encode_documents(self, docs: Iterable[bytes]) -> Iterator[np.ndarray]:
        """Each document's tokens followed by ``eos_id``."""
        for doc in docs:
            ids = np.empty(len(doc) + 1, dtype=np.int32)
            ids[:-1] = np.frombuffer(doc, dtype=np.uint8)
            ids[:-1] += self.offset
            ids[-1] = self.eos_id
            yield ids

    def decode(self, ids: Iterable[int]) -> str:
        # Specials and ids past the vocabulary (a model's vocab_size may be rounded up) decode to nothing.
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def tokens(self, ids: Iterable[int]) -> list[str]:
        return [repr(bytes([i - self.offset]))[2:-1] if i >= self.offset else SPECIAL_TOKENS[i] for i in ids]

    def special_tokens(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(SPECIAL_TOKENS)}

    def fingerprint(self) -> str:
        """Equal for two tokenizers exactly when they turn every document into the same ids."""
        return "byte"

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = {"type": "byte", "vocab_size": self.vocab_size, "special_tokens": list(SPECIAL_TOKENS)}
        (directory / BYTE_TOKENIZER_FILE).write_text(json.dumps(info, indent=2) + "\n")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (BPE trained here, or loaded from a tokenizer.json / Hugging Face directory)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_id: int | None, bos_id: int | None, eos_id: int | None):
        self.tokenizer = tokenizer
        # Special-token strings inside the data are text, not control tokens.
        self.tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.description = f"{type(tokenizer.model).__name__} (tokenizers; text decoded as UTF-8, errors replaced)"

    def encode(self, text: str) -> list[int]:
        # Text from the command line that was not valid UTF-8 holds surrogates; they become U+FFFD as in documents.
        text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_documents(self, docs: Iterable[bytes], batch_size: int = 256) -> Iterator[np.ndarray]:
        """Each document's tokens followed by ``eos_id`` (when the tokenizer has one)."""
        end = [] if self.eos_id is None else [self.eos_id]
        batch: list[str] = []
        for doc in docs:
            batch.append(doc.decode("utf-8", errors="replace"))
            if len(batch) == batch_size:
                yield from self._encode_batch(batch, end)
                batch = []
        if batch:
            yield from self._encode_batch(batch, end)

    def _encode_batch(self, texts: list[str], end: list[int]) -> Iterator[np.ndarray]:
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            yield np.asarray(enc.ids + end, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) for i in ids]

    def special_tokens(self) -> dict[str, int]:
        named = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id}
        return {self.tokenizer.id_to_token(i): i for i in named.values() if i is not None}

    def fingerprint(self) -> str:
        """Equal for two tokenizers exactly when they turn every document into the same ids: a hash of the parts
        of ``tokenizer.json`` that encoding without special tokens uses (added tokens, normalizer, pre-tokenizer,
        model; not the post-processor, padding or truncation, which transformers may change when loading) and
        the end-of-document id."""
        spec = json.loads(self.tokenizer.to_str())
        used = {key: spec.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
        used["eos_id"] = self.eos_id
        return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()

    def save(self, directory: str | Path) -> None:
        """``tokenizer.json`` plus a ``tokenizer_config.json`` naming the special tokens, so the directory also
        loads with ``transformers.AutoTokenizer``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        names = {"pad_token": self.pad_id, "bos_token": self.bos_id, "eos_token": self.eos_id}
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({key: self.tokenizer.id_to_token(i) for key, i in names.items() if i is not None})
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


Tokenizer = ByteTokenizer | HFTokenizer


def check_bpe_vocab_size(vocab_size: int) -> None:
    """``BMojoError`` unless ``vocab_size`` holds the 256 bytes and the special tokens."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise BMojoError(
            f"vocab size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
            f"got {vocab_size}"
        )


def train_bpe(docs: Iterable[bytes], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``docs``; ``SPECIAL_TOKENS`` take ids 0-3."""
    check_bpe_vocab_size(vocab_size)
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((doc.decode("utf-8", errors="replace") for doc in docs), trainer)
    return HFTokenizer(tok, pad_id=0, bos_id=1, eos_id=2)


def _names_code(directory: Path) -> bool:
    """Whether a tokenizer directory's configuration asks for its own Python code (``auto_map``)."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            values = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(values, dict) and "auto_map" in values:
            return True
    return False


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """``"byte"``, a ``tokenizer.json`` file, a directory written by ``save`` or a Hugging Face tokenizer directory."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise BMojoError(
            f"tokenizer {str(spec)!r} not found: give 'byte', a tokenizer.json file or a tokenizer directory"
        )
    if (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # trust_remote_code=False everywhere: a directory's auto_map never makes transformers import (or offer to
    # import) its Python files; the concrete PreTrainedTokenizerFast ignores auto_map altogether.
    try:
        if path.is_file():
            hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif (path / "tokenizer.json").is_file():  # also works without a tokenizer_config.json
            hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        elif _names_code(path):  # AutoTokenizer would need the directory's own code: refused before transformers
            raise BMojoError(
                f"cannot load a tokenizer from {str(path)!r}: its auto_map names Python code, which bmojo never "
                "runs; give a directory with a tokenizer.json"
            )
        else:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except BMojoError:
        raise
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, JSON errors, ...)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__  # one line, all of it
        raise BMojoError(f"cannot load a tokenizer from {str(path)!r}: {reason}") from exc
    if not getattr(hf, "is_fast", False):
        raise BMojoError(
            f"the tokenizer in {str(path)!r} has no fast (tokenizers) version; convert it to tokenizer.json"
        )
    backend = hf.backend_tokenizer
    eos = hf.eos_token_id
    if eos is None:
        eos = next((backend.token_to_id(n) for n in _EOS_NAMES if backend.token_to_id(n) is not None), None)
    return HFTokenizer(backend, pad_id=hf.pad_token_id, bos_id=hf.bos_token_id, eos_id=eos)
