"""The ``bmojo`` command: ``train``, ``eval``, ``generate``, ``export``, ``convert`` and
``tokenizer {train,inspect,encode}``.

Errors in what the user gave (paths, data, settings, checkpoints) print one line ``bmojo: error: ...`` and exit
with status 2 (3 when training diverged); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

import yaml

# Only what the parser needs is imported here (no torch, no transformers): `bmojo --help` and argument errors
# answer at once. The commands import the rest.
from .errors import BMojoError
from .presets import PRESETS
from .settings import DEFAULT_PRESET, TrainConfig, run_file_sections

DATA_HELP = (
    "data source, repeatable: 'stdlib' (the Python standard library's *.py files), a text file, a folder "
    '(its files matching --glob), a .jsonl file (one {"text": ...} per line) or a pre-tokenized .bin '
    "(see `bmojo tokenizer encode`). The byte-level tokenizer reads raw bytes; other tokenizers decode text as "
    "UTF-8 and replace undecodable bytes with U+FFFD"
)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations (`--step 3` is not `--steps 3`); add_parser passes this on to the subcommands' parsers.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"bmojo: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int, high: int | None = None, why: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}{why}, got {value}")
        return value

    return parse


def _float_at_least(low: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------------------------
# Settings: preset < --config file < --set < explicit flags
# ---------------------------------------------------------------------------------------------------------------
# Flags of `bmojo train` that set the training setting of the same name (dashes for underscores); the help
# shows TrainConfig's default.
TRAIN_FLAGS = {
    "--data": dict(action="append", metavar="SOURCE", help=DATA_HELP),
    "--glob": dict(metavar="PATTERN", help="which files of a data folder to read"),
    "--text-key": dict(metavar="KEY", help="JSONL field holding the text"),
    "--tokenizer": dict(metavar="SPEC", help="'byte', a tokenizer.json, or a tokenizer directory"),
    "--out": dict(metavar="DIR", help="run directory"),
    "--steps": dict(type=int, metavar="N", help="optimizer steps"),
    "--batch-size": dict(type=int, metavar="N", help="sequences per optimizer step, over all processes"),
    "--grad-accum": dict(type=int, metavar="N", help="micro-batches accumulated per step"),
    "--seq-len": dict(type=int, metavar="N", help="tokens per sequence (at least the model's chunk_size)"),
    "--lr": dict(type=float, metavar="LR", help="peak learning rate (linear warmup, cosine decay)"),
    "--warmup-steps": dict(type=int, metavar="N", help="steps of linear warmup"),
    "--seed": dict(type=int, metavar="N", help="initialization and data order"),
    "--eval-every": dict(type=int, metavar="N", help="steps between evaluations (0: only before and after)"),
    "--save-every": dict(type=int, metavar="N", help="steps between checkpoints (0: only at the end)"),
    "--device": dict(metavar="NAME", help="cpu, or xla (Trainium through torch-xla; see neuron/README.md)"),
    "--threads": dict(type=int, metavar="N", help="torch threads per process (0: the cores, shared among processes)"),
    "--bf16": dict(action="store_true", help="bfloat16 autocast"),
    "--gradient-checkpointing": dict(
        action="store_true",
        help="recompute each layer's forward in the backward: activation memory ~ one [batch, seq-len, hidden] "
        "tensor per layer, for about a third more compute per step (not with --tp)",
    ),
    "--selective-recompute": dict(
        action="store_true",
        help="recompute only the attention and SSD ops in the backward: about half the saved activations, for one "
        "more forward of those ops per step (not with --tp)",
    ),
    "--tp": dict(type=int, metavar="N", help="tensor-parallel degree (processes per model replica, under torchrun)"),
    "--zero1": dict(action="store_true", help="shard the AdamW state over the data-parallel processes (ZeRO-1)"),
    "--init": dict(
        metavar="DIR",
        help="start from this B'MOJO directory's weights and configuration (`bmojo convert`'s output, a checkpoint "
        "or a run), not a preset; its tokenizer unless --tokenizer",
    ),
    "--teacher": dict(
        metavar="SRC", help="a transformers model directory: add KL(teacher || student) on the logits to the loss"
    ),
    "--distill-weight": dict(type=float, metavar="X", help="weight of the KL term (with --teacher)"),
    "--trainable": dict(
        metavar="GROUPS",
        help="parameter groups that train, comma-separated: new (= ssm,memory), ssm, memory, attention, mlp, "
        "norm, embeddings, all (bmojo.priming)",
    ),
    "--key-set-bias-start": dict(
        type=float,
        metavar="B",
        help="a new run sets every key-set bias to B first: a converted model's sit at -30 where their gradient "
        "vanishes; -2 lets the loss open the fading and eidetic memories (bmojo.evals.prime_study)",
    ),
}

TRAIN_EXAMPLES = """examples:
  bmojo train                                   # 'cpu' preset on the Python standard library -> runs/default
  bmojo train --preset tiny --data notes/ --glob '*.md' --steps 200 --out runs/notes
  bmojo train --config run.yaml --set model.window_size=64 --lr 1e-3
  bmojo train --out runs/notes --resume         # continue after a crash or to more --steps
  bmojo train --config runs/notes/train_config.yaml --out runs/again   # the same run again
  torchrun --standalone --nproc_per_node=2 -m bmojo_cli train --out runs/ddp
  torchrun --standalone --nproc_per_node=4 -m bmojo_cli train --preset tiny --set model.ssm_ngroups=2 \\
      --tp 2 --zero1 --out runs/tp
  bmojo train --init bmojo-llama/ --teacher llama-dir/ --trainable new --data corpus/ --out runs/primed
"""


CONVERT_EXAMPLES = """examples:
  bmojo convert --from llama-dir/ --out bmojo-llama/                        # every layer bmojo, window = context
  bmojo convert --from mistral-dir/ --out bmojo-m/ --layers bmojo,attention  # alternate, Mistral's window
  bmojo convert --from qwen2-dir/ --out bmojo-q/ --window 1024 --layers attention=0,23 --memory-size 64
  bmojo train --init bmojo-llama/ --teacher llama-dir/ --trainable new --data corpus/ --out runs/primed
"""


def read_config_file(path: str) -> dict:
    """A YAML or JSON file with optional ``preset: NAME``, ``model: {...}`` and ``train: {...}``, or a run's own
    ``train_config.yaml``."""
    file = Path(path)
    if not file.is_file():
        raise BMojoError(f"config file {path!r} does not exist")
    try:
        text = file.read_text()
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise BMojoError(f"{path}: cannot parse: {str(exc).splitlines()[0]}") from None
    values = {} if values is None else values
    values = run_file_sections(values) if isinstance(values, dict) else values
    if not isinstance(values, dict) or not set(values) <= {"preset", "model", "train"}:
        raise BMojoError(f"{path}: expected a mapping with the sections preset, model and train")
    for section in ("model", "train"):
        if not isinstance(values.get(section, {}), dict):
            raise BMojoError(f"{path}: section {section!r} must be a mapping")
    return values


def _parse_value(text: str):
    """``--set`` values are YAML scalars or lists (``64``, ``true``, ``[a, b]``); anything else stays text."""
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def resolve_settings(args) -> tuple[str | None, dict, dict]:
    """(preset, model settings, training settings) from ``--config``, ``--set`` and the flags."""
    file = read_config_file(args.config) if args.config else {}
    preset = args.preset or file.get("preset")
    sections = {"model": dict(file.get("model") or {}), "train": dict(file.get("train") or {})}
    for item in args.set or []:
        key, sep, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and name and section in sections):
            raise BMojoError(f"--set expects model.NAME=VALUE or train.NAME=VALUE, got {item!r}")
        sections[section][name] = _parse_value(text)
    for flag in TRAIN_FLAGS:
        name = flag[2:].replace("-", "_")
        if name in vars(args):
            sections["train"][name] = getattr(args, name)
    return preset, sections["model"], sections["train"]


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .training import train

    preset, model_settings, train_settings = resolve_settings(args)
    train(preset, model_settings, train_settings, resume=args.resume, allow_changes=args.allow_changes)
    return 0


def _load_model_and_tokenizer(path: str, tokenizer_spec: str | None, threads: int):
    import torch

    from .checkpoint import load_model, resolve_checkpoint, run_dir_of
    from .tokenization import load_tokenizer
    from .processes import default_threads

    torch.set_num_threads(threads or default_threads(1))
    checkpoint = resolve_checkpoint(path)
    model = load_model(checkpoint)
    run_dir = run_dir_of(checkpoint)
    if tokenizer_spec is None:
        if not (run_dir / "tokenizer").is_dir():
            raise BMojoError(f"no tokenizer directory next to {checkpoint}; pass --tokenizer")
        tokenizer_spec = run_dir / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise BMojoError(
            f"tokenizer {str(tokenizer_spec)!r} has {tokenizer.vocab_size} tokens but the model in {checkpoint} "
            f"has vocab_size {model.config.vocab_size}: they do not belong together"
        )
    # A tokenizer of the same size but other ids would give a meaningless loss (or text) without a word.
    own = run_dir / "tokenizer"
    if Path(tokenizer_spec) != own and own.is_dir() and load_tokenizer(own).fingerprint() != tokenizer.fingerprint():
        raise BMojoError(
            f"tokenizer {str(tokenizer_spec)!r} is not the one {run_dir} was trained with ({own}): it turns "
            "text into other ids; leave out --tokenizer"
        )
    return checkpoint, run_dir, model, tokenizer


def cmd_eval(args) -> int:
    import numpy as np

    from .data import load_corpus
    from .evaluation import evaluate
    from .run_directory import load_train_settings

    checkpoint, run_dir, model, tokenizer = _load_model_and_tokenizer(args.path, args.tokenizer, args.threads)
    run = TrainConfig()
    if (run_dir / "train_config.yaml").is_file():
        run = TrainConfig.from_dict(load_train_settings(run_dir))
    seq_len = args.seq_len or run.seq_len
    if seq_len < model.config.chunk_size:
        raise BMojoError(
            f"--seq-len must be at least the model's chunk_size ({model.config.chunk_size}), got {seq_len}"
        )
    data = args.data or run.data
    corpus = load_corpus(
        data, tokenizer, seq_len, run.val_fraction, args.glob or run.glob, args.text_key or run.text_key
    )
    # The run's own data: its validation split. Other data: all of it.
    windows = corpus.val_windows if not args.data else np.arange(len(corpus.tokens) // seq_len)
    if args.max_batches:
        windows = windows[: args.max_batches * args.batch_size]
    result = evaluate(model, corpus, windows, args.batch_size, model.device, args.bf16)
    result.update(checkpoint=str(checkpoint), data=data, split="validation" if not args.data else "all")
    if args.json:
        print(json.dumps(result))
    else:
        innovation = result["innovation_loss"]
        print(
            f"{checkpoint}: LM loss {result['lm_loss']:.4f} | perplexity {result['perplexity']:.3f}"
            + (f" | innovation loss {innovation:.4f}" if innovation is not None else "")
            + f" | {result['tokens']:,} tokens ({result['split']} of {', '.join(data)})"
        )
    return 0


def cmd_generate(args) -> int:
    from .evaluation import TextStream, generate_text

    _, _, model, tokenizer = _load_model_and_tokenizer(args.path, args.tokenizer, args.threads)
    temperature = 0.0 if args.greedy else args.temperature
    print(args.prompt, end="", flush=True)  # then the continuation, token by token
    stream = TextStream(tokenizer)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature, args.top_k, args.seed, stream)
    print()
    return 0


def cmd_export(args) -> int:
    from .export import export

    source = export(args.path, args.out, args.checkpoint, args.tokenizer)
    print(f"exported {source} -> {args.out} (AutoModelForCausalLM after `import bmojo`, AutoTokenizer)")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    overrides = {}
    for item in args.set or []:
        name, sep, text = item.partition("=")
        if not (sep and name):
            raise BMojoError(f"--set expects NAME=VALUE (a B'MOJO model setting), got {item!r}")
        overrides[name] = _parse_value(text)
    if args.memory_size is not None:
        overrides["memory_size"] = args.memory_size
    if args.gate_init is not None:
        overrides["key_set_bias_init"] = args.gate_init
    config = convert(args.source, args.out, args.layers, args.window, args.chunk_size, overrides, args.seed)
    kinds = ", ".join(f"{config.layers_block_type.count(t)} {t}" for t in ("bmojo", "attention"))
    print(
        f"converted {args.source} -> {args.out}: {config.num_hidden_layers} layers ({kinds}), window "
        f"{config.window_size}, chunk {config.chunk_size}, memory {config.memory_size}; the same function as the "
        f"source on inputs of up to {config.window_size} tokens. Prime it: bmojo train --init {args.out} "
        f"--teacher {args.source} --trainable new --data ..."
    )
    return 0


def cmd_tokenizer_train(args) -> int:
    from .data import make_parent_dirs, read_documents, source_files
    from .tokenization import check_bpe_vocab_size, train_bpe

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BMojoError(f"--out {args.out!r} is a file; the tokenizer is written to a directory")
    check_bpe_vocab_size(args.vocab_size)  # bad input is refused before anything is written
    files = [f for source in args.data for f in source_files(source, args.glob)]
    make_parent_dirs(out / "tokenizer.json")  # fails before training when a folder above --out is a file
    tokenizer = train_bpe(read_documents(files, args.text_key), args.vocab_size)
    try:
        tokenizer.save(out)
    except OSError as exc:
        raise BMojoError(f"cannot write the tokenizer to {args.out!r}: {exc.strerror or exc}") from None
    print(f"trained a BPE tokenizer of {tokenizer.vocab_size} tokens on {len(files)} file(s) -> {args.out}")
    return 0


def cmd_tokenizer_inspect(args) -> int:
    from .tokenization import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(args.text)
    specials = " ".join(f"{name}={i}" for name, i in tokenizer.special_tokens().items())
    print(f"tokenizer:      {args.tokenizer}")
    print(f"kind:           {tokenizer.description}")
    print(f"vocab size:     {tokenizer.vocab_size}")
    print(f"special tokens: {specials or '(none)'} (end of document: {tokenizer.eos_id})")
    print(
        f"example:        {args.text!r} -> {len(ids)} tokens "
        f"({len(args.text.encode(errors='surrogateescape')) / max(1, len(ids)):.2f} bytes/token)"
    )
    print(f"  ids:          {ids}")
    print(f"  tokens:       {tokenizer.tokens(ids)}")
    return 0


def cmd_tokenizer_encode(args) -> int:
    from .data import read_documents, source_files, token_dtype, write_token_file
    from .tokenization import load_tokenizer

    out = Path(args.out)
    if out.suffix != ".bin":
        raise BMojoError(f"--out must name a .bin file (the data sources read only *.bin as tokens), got {args.out!r}")
    if out.is_dir():
        raise BMojoError(f"--out {args.out!r} is a directory; give the .bin file to write")
    tokenizer = load_tokenizer(args.tokenizer)
    files = [f for source in args.data for f in source_files(source, args.glob)]
    inputs = {f.resolve() for f in files}
    for written in (out, out.with_name(out.name + ".json")):
        if written.resolve() in inputs:
            raise BMojoError(f"--out would overwrite {str(written)!r}, which is one of the --data files")
    docs = (doc for doc in read_documents(files, args.text_key) if doc)
    first = next(docs, None)
    if first is None:  # checked before anything is written
        raise BMojoError(f"data {', '.join(args.data)!r} holds no text (all files are empty)")
    count = write_token_file(out, tokenizer.encode_documents(itertools.chain([first], docs)), tokenizer.vocab_size)
    print(f"wrote {count:,} tokens ({token_dtype(tokenizer.vocab_size).name}) from {len(files)} file(s) to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------
# Long on purpose: every command's flags are declared here, in --help order, one call per flag.
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bmojo", description="Train, evaluate and sample B'MOJO language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model (default: the 'cpu' preset on the Python standard library, ~12 minutes on 2 cores)",
        description="Train a model. Settings apply in order: the preset, --config, --set, the flags.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})")
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file with 'preset', 'model' and 'train' sections")
    train.add_argument(
        "--set", action="append", metavar="SECTION.NAME=VALUE", help="override one setting, e.g. model.window_size=64"
    )
    defaults = TrainConfig()
    for flag, options in TRAIN_FLAGS.items():
        default = getattr(defaults, flag[2:].replace("-", "_"))
        shown = ", ".join(default) if isinstance(default, list) else (default if default != "" else "none")
        options = {**options, "help": f"{options['help']} (default: {shown})"}
        train.add_argument(flag, default=argparse.SUPPRESS, **options)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest intact checkpoint (its saved settings apply; a damaged "
        "newer checkpoint is set aside with a warning). SIGTERM or Ctrl-C saves a checkpoint to continue from",
    )
    train.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: accept settings that differ from the run's (refused otherwise, except --steps, "
        "--eval-every, --save-every, --threads, --tp, --zero1, --gradient-checkpointing, --selective-recompute, "
        "train.keep_checkpoints and the sample settings); resuming to other "
        "--steps keeps the run's cosine schedule (train.decay_steps)",
    )
    train.set_defaults(run=cmd_train)

    # Every option of eval and generate states its default in --help (tests/test_bad_input.py checks).
    def inference_args(p):
        p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
        p.add_argument(
            "--tokenizer",
            help="'byte', a tokenizer.json or a tokenizer directory: for a checkpoint outside its run directory "
            "(a run accepts only its own tokenizer) (default: the run's tokenizer/)",
        )
        cores = os.cpu_count() or 1
        p.add_argument(
            "--threads",
            type=_int_at_least(0, cores, " (the CPU cores)"),
            default=0,
            help="torch threads (default: 0, all cores)",
        )

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint", description="Perplexity of a checkpoint.")
    inference_args(evaluate)
    evaluate.add_argument(
        "--data", action="append", metavar="SOURCE", help=DATA_HELP + " (default: the run's validation split)"
    )
    evaluate.add_argument("--glob", help="which files of a data folder to read (default: the run's, else *)")
    evaluate.add_argument("--text-key", help="JSONL field holding the text (default: the run's, else text)")
    evaluate.add_argument("--seq-len", type=_int_at_least(1), help="tokens per sequence (default: the run's)")
    evaluate.add_argument("--batch-size", type=_int_at_least(1), default=8, help="sequences per batch (default: 8)")
    evaluate.add_argument(
        "--max-batches", type=_int_at_least(1), help="evaluate at most this many batches (default: all)"
    )
    evaluate.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default: off, float32)")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON object (default: text)")
    evaluate.set_defaults(run=cmd_eval)

    generate = commands.add_parser("generate", help="sample text from a checkpoint", description="Sample text.")
    inference_args(generate)
    generate.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    generate.add_argument(
        "--max-new-tokens", type=_int_at_least(1), default=200, help="tokens to generate at most (default: 200)"
    )
    generate.add_argument(
        "--temperature", type=_float_at_least(0.0), default=0.8, help="0 decodes greedily (default: 0.8)"
    )
    generate.add_argument(
        "--top-k", type=_int_at_least(0), default=50, help="sample from the k likeliest (0: all) (default: 50)"
    )
    generate.add_argument(
        "--greedy", action="store_true", help="always take the likeliest token (default: off, sample)"
    )
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    generate.set_defaults(run=cmd_generate)

    export = commands.add_parser(
        "export",
        help="write a directory that transformers' AutoModelForCausalLM and AutoTokenizer load",
        description="Write a checkpoint and its tokenizer to a new directory that "
        "AutoModelForCausalLM.from_pretrained (after `import bmojo`) and AutoTokenizer.from_pretrained load.",
    )
    export.add_argument("path", help="a run directory or a checkpoint directory")
    export.add_argument("--out", required=True, metavar="DIR", help="the directory to write (new, or empty)")
    export.add_argument(
        "--checkpoint", metavar="STEP", help="a step number, step_XXXXXX or a checkpoint directory (default: newest)"
    )
    export.add_argument("--tokenizer", help="override the run's tokenizer")
    export.set_defaults(run=cmd_export)

    conv = commands.add_parser(
        "convert",
        help="turn a transformers Llama / Mistral / Qwen2 directory into a B'MOJO that computes the same function",
        description="Convert a local transformers checkpoint directory (config.json, safetensors, tokenizer) of "
        "LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM into a B'MOJO directory that "
        "BMojoForCausalLM.from_pretrained loads. The new paths (SSM fading keys, eidetic memory) start silenced "
        "(key-set biases at --gate-init), so the result computes the source's logits on inputs of up to --window "
        "tokens; then prime it with `bmojo train --init OUT --teacher SRC`.",
        epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("--from", dest="source", required=True, metavar="SRC", help="the transformers model directory")
    conv.add_argument("--out", required=True, metavar="DST", help="the directory to write (new, or empty)")
    conv.add_argument(
        "--layers",
        metavar="PATTERN",
        help="which layers become bmojo and which stay attention: a list of types repeated over the layers "
        "('bmojo,attention' alternates, starting with layer 0) or TYPE=INDICES ('bmojo=0,4-7': those layers bmojo, "
        "the rest attention; 'attention=0,31': the reverse) (default: every layer bmojo)",
    )
    conv.add_argument(
        "--window",
        type=_int_at_least(1),
        metavar="W",
        help="attention window, a multiple of --chunk-size; exact for inputs up to W tokens (default: the source's "
        "sliding_window, else its max_position_embeddings rounded up to a multiple of the chunk size)",
    )
    conv.add_argument(
        "--chunk-size", type=_int_at_least(1), default=128, metavar="C", help="chunk of the scans (default: 128)"
    )
    conv.add_argument(
        "--memory-size", type=_int_at_least(0), metavar="M", help="eidetic slots per bmojo layer (default: B'MOJO's)"
    )
    conv.add_argument(
        "--gate-init",
        type=float,
        metavar="B",
        help="initial per-head bias of the fading and eidetic logits (key_set_bias_init) (default: -30, where a "
        "bmojo layer is sliding-window attention to float32 rounding)",
    )
    conv.add_argument(
        "--set", action="append", metavar="NAME=VALUE", help="any other B'MOJO model setting, e.g. ssm_state_size=64"
    )
    conv.add_argument("--seed", type=int, default=0, help="initialization of the new parameters (default: 0)")
    conv.set_defaults(run=cmd_convert)

    tok = commands.add_parser("tokenizer", help="train, inspect or apply a tokenizer", description="Tokenizers.")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")

    def data_args(p):
        p.add_argument("--data", action="append", required=True, metavar="SOURCE", help=DATA_HELP)
        p.add_argument("--glob", default="*", help="which files of a data folder to read (default: *)")
        p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")

    tok_train = tok_commands.add_parser("train", help="train a byte-level BPE tokenizer with `tokenizers`")
    data_args(tok_train)
    tok_train.add_argument("--vocab-size", type=_int_at_least(1, 1 << 32, " (ids are stored as uint32)"), required=True)
    tok_train.add_argument(
        "--out", required=True, help="directory to write (tokenizer.json, tokenizer_config.json); not a file"
    )
    tok_train.set_defaults(run=cmd_tokenizer_train)

    tok_inspect = tok_commands.add_parser("inspect", help="vocabulary size, special tokens and an example")
    tok_inspect.add_argument("tokenizer", help="'byte', a tokenizer.json, or a tokenizer directory")
    tok_inspect.add_argument("--text", default="def hello(name):\n    return f'hi {name}'\n", help="example text")
    tok_inspect.set_defaults(run=cmd_tokenizer_inspect)

    tok_encode = tok_commands.add_parser("encode", help="pre-tokenize data into a memory-mapped .bin corpus")
    data_args(tok_encode)
    tok_encode.add_argument("--tokenizer", default="byte", help="'byte' (default), a tokenizer.json, or a directory")
    tok_encode.add_argument(
        "--out", required=True, help="the .bin file to write (plus its .bin.json header); not one of the --data files"
    )
    tok_encode.set_defaults(run=cmd_tokenizer_encode)
    return parser


def set_thread_environment() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless already set), which
    OpenMP reads once, when torch loads it. Spinning threads were at best 14% faster on a quiet machine and up to
    22x slower when other processes kept a core busy (README, "CPU threads"; ``bmojo.processes.default_threads``)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed (``--help`` and argument errors exit here) without importing torch."""
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; a ``BMojoError`` becomes one line on stderr and its exit status."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save/load progress bars would drown the training bar
    try:
        return args.run(args)
    except BMojoError as exc:
        print(f"bmojo: error: {exc}", file=sys.stderr)
        return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
