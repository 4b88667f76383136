"""``bmojo export RUN --out DIR``: a checkpoint and its tokenizer as one directory that transformers loads::

    import bmojo  # registers the "bmojo" model type with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DIR)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

The directory holds ``config.json`` + ``model.safetensors`` (``save_pretrained``) and the tokenizer as a
``PreTrainedTokenizerFast`` (``tokenizer.json``, ``tokenizer_config.json``). No code: ``trust_remote_code`` is not
needed. The byte-level tokenizer becomes an equivalent ``tokenizers`` tokenizer (``byte_level_tokenizer``).

What the transformers tokenizer cannot do like bmojo's: it takes ``str``, not raw bytes, so a document that is not
UTF-8 cannot be passed to it as it is; decoding ids whose bytes are not UTF-8 gives U+FFFD for them, as
``ByteTokenizer.decode`` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .checkpoint import list_checkpoints, load_model, resolve_checkpoint, run_dir_of
from .errors import BMojoError
from .tokenization import SPECIAL_TOKENS, ByteTokenizer, Tokenizer, load_tokenizer

PORTABLE = {"tokenizer_class": "PreTrainedTokenizerFast"}


def byte_level_tokenizer() -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes and decodes as ``ByteTokenizer``: the specials ``<pad> <bos> <eos>
    <unk>`` are ids 0-3 and byte ``b`` is id ``4 + b`` (GPT-2's byte-to-character map names the 256 tokens; no
    merges, no pre-splitting, no normalization), decoding with invalid UTF-8 replaced by U+FFFD."""
    vocab = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: ByteTokenizer.offset + b for b, c in bytes_to_unicode().items()})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters, which the ``tokenizers`` ByteLevel pre-tokenizer and decoder
    apply (their ``ByteLevel.alphabet()``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """``tokenizer`` as a transformers ``PreTrainedTokenizerFast``. Special-token names inside text stay text
    (``split_special_tokens``), as when bmojo encodes its training data."""
    backend = byte_level_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer.tokenizer
    names = {"pad_token": tokenizer.pad_id, "bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    if isinstance(tokenizer, ByteTokenizer):
        names["unk_token"] = SPECIAL_TOKENS.index("<unk>")
    specials = {key: backend.id_to_token(i) for key, i in names.items() if i is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, split_special_tokens=True, **specials
    )


def find_checkpoint(run: str | Path, checkpoint: str | None) -> Path:
    """``checkpoint``: None (the newest of ``run``), a step number, a ``step_XXXXXX`` name or a directory."""
    if checkpoint is None:
        return resolve_checkpoint(run)
    if Path(checkpoint).is_dir():
        return resolve_checkpoint(checkpoint)
    match = re.fullmatch(r"(?:step_)?(\d+)", checkpoint)
    found = {int(p.name[5:]): p for p in list_checkpoints(run)}
    if match and int(match.group(1)) in found:
        return found[int(match.group(1))]
    steps = ", ".join(map(str, found)) or "none"
    raise BMojoError(f"--checkpoint {checkpoint!r} is not a checkpoint of {str(run)!r} (its steps: {steps})")


def export(run: str | Path, out: str | Path, checkpoint: str | None = None, tokenizer: str | None = None) -> Path:
    """Write the model of ``run`` (its newest checkpoint, or ``checkpoint``) and its tokenizer (the run's, or
    ``tokenizer``) to the new directory ``out``; return the checkpoint exported. ``out`` appears complete or not
    at all."""
    source = find_checkpoint(run, checkpoint)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise BMojoError(f"--out {str(out)!r} exists and is not an empty directory")
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():
        raise BMojoError(f"cannot write {str(out)!r}: {str(above)!r} is not a directory")
    if tokenizer is None:
        if not (run_dir_of(source) / "tokenizer").is_dir():
            raise BMojoError(f"no tokenizer directory next to {source}; pass --tokenizer")
        tokenizer = run_dir_of(source) / "tokenizer"
    tok = load_tokenizer(tokenizer)
    model = load_model(source)
    if tok.vocab_size > model.config.vocab_size:
        raise BMojoError(
            f"tokenizer {str(tokenizer)!r} has {tok.vocab_size} tokens but the model in {source} has vocab_size "
            f"{model.config.vocab_size}: they do not belong together"
        )
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        hf_tokenizer(tok).save_pretrained(tmp)
        # transformers 5 writes its own class name, which 4.5x does not know; both load this one.
        config_file = tmp / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **PORTABLE}, indent=2) + "\n")
        os.replace(tmp, out)  # replaces an empty directory
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BMojoError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    return source
