"""Start from a pretrained Transformer, measured: a small Llama trained on the embedded corpus, converted to a
window-limited B'MOJO, primed; perplexity at 1x and 4x the source's training length.

    python -m bmojo.evals.prime_study --threads 1        # -> docs/prime.{json,md}, runs in runs/prime_study
    python -m bmojo.evals.prime_study --quick --out DIR  # a smoke run

1. *source*: a transformers ``LlamaForCausalLM`` (byte vocabulary) trained for ``source_steps`` on sequences of
   ``seq_len`` tokens (``max_position_embeddings = seq_len``), saved as a transformers directory;
2. *converted*: ``bmojo convert --window W`` with ``W = seq_len / 8``: every layer ``bmojo``, the new key sets
   silenced (key-set biases at -30), so it is the source with a window of ``W`` tokens;
3. *primed*: ``bmojo train --init converted --teacher source --trainable new --key-set-bias-start B`` for
   ``prime_steps`` on sequences of ``seq_len``: only the SSM, the key-set biases and the innovation predictor learn;
4. *primed, memories silenced*: the primed model with its key-set biases put back to -30 (sliding-window attention
   again, with the primed weights): what the opened memories contribute.

Every model is evaluated on the same held-out tokens cut into windows of ``seq_len`` and ``4 * seq_len``. The
source's rotary positions beyond ``seq_len`` are unseen in training (what length generalisation tests); the
converted model never looks further back than ``W``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..convert import GATE_INIT, convert
from ..configuration_bmojo import V0_OPTIONS
from ..data import STDLIB, batch_positions, load_corpus
from ..priming import key_set_bias_values, set_key_set_biases
from ..tokenization import ByteTokenizer
from ..training import train


@dataclass
class PrimeStudyConfig:
    """Small enough for a few minutes on one CPU thread."""

    data: list[str] = field(default_factory=lambda: [STDLIB])
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    seq_len: int = 128  # the source's training length and max_position_embeddings
    source_steps: int = 400
    source_lr: float = 3e-3
    batch_size: int = 16
    window: int = 16  # the converted model's window
    chunk: int = 16
    memory_size: int = 16
    prime_steps: int = 300
    prime_lr: float = 3e-3
    prime_batch_size: int = 8
    key_set_bias_start: float = -2.0
    trainable: str = "new"
    distill_weight: float = 1.0
    eval_tokens: int = 16384  # held-out tokens, the same at both lengths
    seed: int = 0
    original_design: bool = False  # convert to B'MOJO's original design (V0, but the key-set biases) instead


# The original design (V0_OPTIONS) but the key-set biases, which a conversion always has (its silenced gates).
ORIGINAL = {name: value for name, value in V0_OPTIONS.items() if not name.startswith("key_set_bias")}
SOURCE_FIELDS = ("data", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "seq_len",
                 "source_steps", "source_lr", "batch_size", "seed")  # fmt: skip
QUICK = dict(hidden_size=32, intermediate_size=64, seq_len=32, source_steps=3, batch_size=4, window=8, chunk=8,
             memory_size=4, prime_steps=3, prime_batch_size=2, eval_tokens=512)  # fmt: skip


def train_source(study: PrimeStudyConfig, corpus, vocab_size: int, directory: Path):
    """A Llama trained with AdamW (linear warmup, cosine decay) on ``corpus``'s training windows; saved with the
    byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(study.seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=study.hidden_size, intermediate_size=study.intermediate_size,
        num_hidden_layers=study.num_layers, num_attention_heads=study.num_heads,
        num_key_value_heads=study.num_kv_heads, max_position_embeddings=study.seq_len, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=study.source_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, study.source_steps // 20)
    for step in range(study.source_steps):
        ramp = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * step / study.source_steps))
        for group in optimizer.param_groups:
            group["lr"] = study.source_lr * ramp
        x = corpus.batch(corpus.train_windows[batch_positions(study.seed, step, study.batch_size,
                                                              len(corpus.train_windows))])  # fmt: skip
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval().save_pretrained(directory)
    ByteTokenizer().save(directory)
    return model


@torch.no_grad()
def perplexities(model, tokens: torch.Tensor, lengths, batch_tokens: int = 8192) -> dict[int, float]:
    """``tokens [N, Lmax]`` cut into windows of each length; next-token perplexity from the logits (any causal LM)."""
    model.eval()
    result = {}
    for length in lengths:
        windows = tokens.reshape(-1, length)
        per = max(1, batch_tokens // length)
        total = 0.0
        for start in range(0, len(windows), per):
            x = windows[start : start + per]
            logits = model(input_ids=x).logits[:, :-1].float()
            total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        result[length] = math.exp(total / (len(windows) * (length - 1)))
    return result


def bias_means(model) -> dict[str, float]:
    """Mean key-set bias per key set (over layers and heads)."""
    values = key_set_bias_values(model)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in values})
    return {k: torch.cat([v for n, v in values.items() if n.endswith("." + k)]).mean().item() for k in kinds}


def run_study(study: PrimeStudyConfig, runs: Path, threads: int = 1) -> dict:
    """Train, convert, prime and evaluate (into ``runs``); returns the results."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    tokenizer = ByteTokenizer()
    vocab = -(-tokenizer.vocab_size // 8) * 8
    lengths = (study.seq_len, 4 * study.seq_len)
    corpus = load_corpus(study.data, tokenizer, study.seq_len, val_fraction=0.01)
    held = load_corpus(study.data, tokenizer, lengths[1], val_fraction=0.01)
    count = max(1, study.eval_tokens // lengths[1])
    held_out = held.batch(held.val_windows[:count])
    runs.mkdir(parents=True, exist_ok=True)
    source_dir, converted_dir, run = runs / "source", runs / "converted", runs / "primed"
    for stale in (converted_dir, run):  # this study's own outputs, remade every time
        shutil.rmtree(stale, ignore_errors=True)
    # The source is reused when it was trained with the same settings (another priming setting, the same source).
    recipe = {k: v for k, v in asdict(study).items() if k in SOURCE_FIELDS}
    marker = source_dir / "study_source.json"
    saved = json.loads(marker.read_text()) if marker.is_file() else {}
    if saved.get("recipe") == recipe:
        from transformers import LlamaForCausalLM

        source = LlamaForCausalLM.from_pretrained(source_dir).eval()
        source_time = saved["seconds"]
    else:
        shutil.rmtree(source_dir, ignore_errors=True)
        source = train_source(study, corpus, vocab, source_dir)
        source_time = time.perf_counter() - started
        marker.write_text(json.dumps({"recipe": recipe, "seconds": source_time}))
    reused = bool(saved.get("recipe") == recipe)
    convert(source_dir, converted_dir, window=study.window, chunk_size=study.chunk,
            overrides=dict(memory_size=study.memory_size, **(ORIGINAL if study.original_design else {})),
            seed=study.seed)  # fmt: skip
    converted = ckpt.load_model(converted_dir)
    settings = dict(
        data=study.data, out=str(run), init=str(converted_dir), teacher=str(source_dir), trainable=study.trainable,
        distill_weight=study.distill_weight, key_set_bias_start=study.key_set_bias_start, seq_len=study.seq_len,
        batch_size=study.prime_batch_size, steps=study.prime_steps, lr=study.prime_lr,
        warmup_steps=max(1, study.prime_steps // 20), seed=study.seed, threads=threads, eval_every=0,
        save_every=0, sample_tokens=40,
    )  # fmt: skip
    primed_started = time.perf_counter()
    train(None, {}, settings)
    prime_time = time.perf_counter() - primed_started
    primed = ckpt.load_model(ckpt.list_checkpoints(run)[-1])
    silenced = ckpt.load_model(ckpt.list_checkpoints(run)[-1])
    set_key_set_biases(silenced, GATE_INIT)
    models = {"source": source, "converted": converted, "primed": primed, "primed, memories silenced": silenced}
    table = {name: {str(k): v for k, v in perplexities(m, held_out, lengths).items()} for name, m in models.items()}
    return {
        "settings": asdict(study),
        "held_out_tokens": held_out.numel(),
        "perplexity": table,
        "key_set_bias_mean": {"converted": bias_means(converted), "primed": bias_means(primed)},
        "key_set_bias_start": study.key_set_bias_start,
        "seconds": {"source_training": source_time, "priming": prime_time, "total": time.perf_counter() - started},
        "source_reused": reused,
    }


def write_report(results: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": command, **results}
    (out / "prime.json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["settings"]
    lengths = list(next(iter(results["perplexity"].values())))
    sec = results["seconds"]
    reused = " in an earlier run, reused" if results["source_reused"] else ""
    lines = [
        "# Start from a pretrained Transformer: source, converted, primed",
        "",
        f"`{command}` (training the source {sec['source_training']:.0f} s{reused}, priming {sec['priming']:.0f} s, "
        f"this run {sec['total']:.0f} s). "
        f"Source: a Llama ({s['num_layers']} layers, d={s['hidden_size']}, {s['num_heads']} heads / "
        f"{s['num_kv_heads']} KV) trained {s['source_steps']} steps on {s['batch_size']} x {s['seq_len']} bytes of "
        f"{', '.join(s['data'])}. Converted: every layer bmojo, window {s['window']}, memory {s['memory_size']}. "
        f"Primed: {s['prime_steps']} steps of {s['prime_batch_size']} x {s['seq_len']}, --trainable "
        f"{s['trainable']}, KL weight {s['distill_weight']}, key-set biases started at {s['key_set_bias_start']}. "
        f"Perplexity on {results['held_out_tokens']:,} held-out tokens:",
        "",
        "| model | " + " | ".join(f"L = {length} ({int(length) // s['seq_len']}x)" for length in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name, row in results["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[length]:.3f}" for length in lengths) + " |")
    before, after = results["key_set_bias_mean"]["converted"], results["key_set_bias_mean"]["primed"]
    lines += [
        "",
        "Mean key-set bias (the gates): "
        + "; ".join(f"{k}: {before[k]:.1f} converted, {results['key_set_bias_start']:.1f} at the start of priming, "
                    f"{after[k]:.2f} primed" for k in before),  # fmt: skip
        "",
    ]
    (out / "prime.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 steps: a smoke run")
    parser.add_argument("--data", action="append", help="data sources (default: stdlib)")
    parser.add_argument("--runs", default="runs/prime_study", help="where the models are written")
    parser.add_argument("--out", default="docs", help="where prime.json and prime.md are written")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a PrimeStudyConfig field")
    args = parser.parse_args(argv)
    study = PrimeStudyConfig(**(QUICK if args.quick else {}))
    if args.data:
        study.data = args.data
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(study, name))
        setattr(study, name, kind(value))
    results = run_study(study, Path(args.runs), args.threads)
    command = "python -m bmojo.evals.prime_study" + (" --quick" if args.quick else "") + f" --threads {args.threads}"
    command += "".join(f" --set {item}" for item in args.set)
    write_report(results, Path(args.out), command)
    print((Path(args.out) / "prime.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
