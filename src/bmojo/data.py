"""Corpora: reading, tokenizing, packing into fixed-length sequences, the train/validation split and the order
in which training visits the sequences.

A data source is one of

* ``"stdlib"``: every ``*.py`` file of the running Python's standard library (``site-packages`` left out),
  a real corpus present on every machine with Python;
* a text file, or a folder: its files matching ``glob`` (default ``*``), recursively, hidden ones left out;
* a ``.jsonl`` file: one JSON object per line whose ``text_key`` field (default ``"text"``) is a document
  (UTF-8, with or without a byte-order mark);
* a ``.bin`` file of pre-tokenized data (``write_token_file``): read through a memory map, never loaded whole;
  every token id is checked against the header's vocabulary size when it is opened.

Documents are raw bytes; see ``tokenization`` for what happens to bytes that are not valid UTF-8. Every document
ends with the tokenizer's end-of-document token, and the concatenated stream is cut into back-to-back windows
of ``seq_len`` tokens (sequence packing; the partial last window is dropped).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import BMojoError

STDLIB = "stdlib"
TOKEN_FILE_FORMAT = "bmojo-tokens"
_CHECK_CHUNK = 1 << 24  # tokens per slice when checking a .bin's ids (32 MiB of uint16 at a time)


# ---------------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.relative_to(root).parts]


def source_files(source: str, glob: str = "*") -> list[Path]:
    """The files a data source names, in a fixed (sorted) order."""
    if source == STDLIB:
        files = stdlib_files()
        if not files:
            raise BMojoError(f"no *.py files found in the standard library at {sysconfig.get_paths()['stdlib']}")
        return files
    path = Path(source)
    if not path.exists():
        raise BMojoError(f"data path {source!r} does not exist")
    if path.is_file():
        return [path]
    files = [
        p
        for p in sorted(path.rglob(glob))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise BMojoError(f"data folder {source!r} holds no files matching {glob!r}")
    return files


def read_documents(files: list[Path], text_key: str = "text") -> Iterator[bytes]:
    """Each text file is one document; each line of a ``.jsonl`` file is one."""
    for path in files:
        if path.suffix == ".bin":
            raise BMojoError(f"{path}: a pre-tokenized .bin corpus must be the only data source")
        if path.suffix != ".jsonl":
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise BMojoError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from None
            yield data
            continue
        yield from _read_jsonl(path, text_key)


def _read_jsonl(path: Path, text_key: str) -> Iterator[bytes]:
    try:
        # utf-8-sig: a byte-order mark at the start of the file (as some Windows editors write) is not JSON
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BMojoError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
                text = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise BMojoError(f"{path}:{line_no}: expected a JSON object with a string field {text_key!r}")
                yield text.encode("utf-8", errors="replace")
    except OSError as exc:
        raise BMojoError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenized corpora: a flat .bin of tokens and a JSON sidecar <name>.bin.json
# ---------------------------------------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def make_parent_dirs(path: Path) -> None:
    """Create the folders above ``path``; a BMojoError naming the culprit when one of them is a file."""
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise BMojoError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BMojoError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def write_token_file(path: str | Path, token_chunks: Iterator[np.ndarray], vocab_size: int) -> int:
    """Stream token arrays into ``path`` (little-endian uint16, or uint32 for vocabularies over 65,536) and
    write the sidecar last, so a file without one is known to be incomplete. The tokens go to a temporary file
    beside ``path`` that replaces it once complete: an error midway leaves an existing ``path`` as it was.
    Returns the number of tokens."""
    path = Path(path)
    dtype = token_dtype(vocab_size).newbyteorder("<")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        make_parent_dirs(path)
        with open(tmp, "wb") as f:
            for chunk in token_chunks:
                f.write(chunk.astype(dtype).tobytes())
                count += len(chunk)
        _sidecar(path).unlink(missing_ok=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise BMojoError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; never made when its folder could not be
            tmp.unlink(missing_ok=True)
    header = {
        "format": TOKEN_FILE_FORMAT,
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "num_tokens": count,
    }
    _sidecar(path).write_text(json.dumps(header, indent=2) + "\n")
    return count


def read_token_file(path: str | Path) -> tuple[np.ndarray, dict]:
    """A read-only memory map of the tokens, and the header."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise BMojoError(f"{path}: missing header {sidecar.name} (write .bin corpora with `bmojo tokenizer encode`)")
    try:
        header = json.loads(sidecar.read_text())
        ok = (
            header.get("format") == TOKEN_FILE_FORMAT
            and header.get("dtype") in ("uint16", "uint32")
            and isinstance(header.get("num_tokens"), int)
            and isinstance(header.get("vocab_size"), int)
        )
    except (json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise BMojoError(f"{sidecar}: not a {TOKEN_FILE_FORMAT} header")
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError as exc:
        raise BMojoError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if size is None:
        raise BMojoError(f"{path}: not a file (its header {sidecar.name} is there)")
    if size != header["num_tokens"] * dtype.itemsize:
        raise BMojoError(f"{path}: {size} bytes, but the header promises {header['num_tokens']} {dtype.name} tokens")
    if size == 0:
        raise BMojoError(f"{path}: holds no tokens")
    try:
        tokens = np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise BMojoError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    check_token_ids(tokens, header["vocab_size"], path)
    return tokens, header


def check_token_ids(tokens: np.ndarray, vocab_size: int, name) -> None:
    """Raise unless every id is below ``vocab_size``: a vectorised max over slices of the file (memory stays
    small), so a bad id is found before training starts, not at the first batch that holds it."""
    slices = range(0, len(tokens), _CHECK_CHUNK)
    top = max(int(tokens[i : i + _CHECK_CHUNK].max()) for i in slices)
    if top < vocab_size:
        return
    bad = (i for i in slices if tokens[i : i + _CHECK_CHUNK].max() >= vocab_size)
    i = next(bad)
    first = i + int(np.argmax(tokens[i : i + _CHECK_CHUNK] >= vocab_size))
    raise BMojoError(
        f"{name}: holds token id {top} (the first out-of-range one at token {first:,}), but the vocabulary has "
        f"{vocab_size} tokens (ids 0..{vocab_size - 1}): the file is corrupt or was written for another tokenizer"
    )


# ---------------------------------------------------------------------------------------------------------------
# A corpus: the token stream, packed into windows, split into train and validation
# ---------------------------------------------------------------------------------------------------------------
class Corpus:
    """``tokens`` cut into windows of ``seq_len``; a fixed random ``val_fraction`` of the windows (at least one)
    is held out for validation. The split depends on the data and ``seq_len`` only, never on the seed, and
    ``val_windows`` is in random order, so any prefix of it is a fair sample of the corpus."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, name: str = "data"):
        self.tokens = tokens
        self.seq_len = seq_len
        num_windows = len(tokens) // seq_len
        if num_windows < 2:
            raise BMojoError(
                f"{name} has {len(tokens):,} tokens, too few for seq_len {seq_len}: need at least {2 * seq_len} "
                "(one training and one validation sequence)"
            )
        order = np.random.default_rng(0).permutation(num_windows)
        num_val = min(max(1, round(num_windows * val_fraction)), num_windows - 1)
        self.val_windows = order[:num_val]
        self.train_windows = np.sort(order[num_val:])

    def batch(self, windows: np.ndarray) -> torch.Tensor:
        """Token ids ``[len(windows), seq_len]`` (int64) of the given window indices."""
        rows = [np.asarray(self.tokens[w * self.seq_len : (w + 1) * self.seq_len], dtype=np.int64) for w in windows]
        return torch.from_numpy(np.stack(rows))


def load_corpus(
    sources: list[str], tokenizer, seq_len: int, val_fraction: float, glob: str = "*", text_key: str = "text"
) -> Corpus:
    """Read, tokenize and split the sources (a ``.bin`` source is memory-mapped instead)."""
    if not sources:
        raise BMojoError("no data given")
    name = ", ".join(sources)
    bins = [s for s in sources if s.endswith(".bin")]
    if bins:
        if len(sources) > 1:
            raise BMojoError(f"{bins[0]}: a pre-tokenized .bin corpus must be the only data source")
        tokens, header = read_token_file(bins[0])
        if header["vocab_size"] != tokenizer.vocab_size:
            raise BMojoError(
                f"{bins[0]} was tokenized with a vocabulary of {header['vocab_size']} tokens, "
                f"but the tokenizer has {tokenizer.vocab_size}"
            )
        return Corpus(tokens, seq_len, val_fraction, name)
    files = [f for source in sources for f in source_files(source, glob)]
    chunks = list(tokenizer.encode_documents(doc for doc in read_documents(files, text_key) if doc))
    if not chunks:
        raise BMojoError(f"data {name!r} holds no text (all files are empty)")
    tokens = np.concatenate(chunks).astype(token_dtype(tokenizer.vocab_size))
    return Corpus(tokens, seq_len, val_fraction, name)


# ---------------------------------------------------------------------------------------------------------------
# Training order
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_positions(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Positions (into the ``n`` training windows) of the sequences of the global batch of ``step`` (0-based).

    Sample ``step * batch_size + j`` is read from a fresh permutation per epoch, a function of ``(seed, epoch)``
    alone: the order is a pure function of ``(seed, step)``, so a resumed run sees exactly what an
    uninterrupted one would."""
    index = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = index // n
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = _epoch_permutation(seed, int(epoch), n)[index[here] % n]
    return out
