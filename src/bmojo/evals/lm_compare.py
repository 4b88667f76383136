"""Language modelling: the five variants at equal parameters and tokens, and perplexity vs evaluation length.

    python -m bmojo.evals.lm_compare --threads 1                  # -> docs/lm.{json,md,png}, runs in runs/lm_compare
    python -m bmojo.evals.lm_compare --quick --data FILE --out DIR  # a smoke run (what the test suite runs)

Every variant (``bmojo.evals.variants``) is trained by ``bmojo train`` on the same data, with the same settings,
steps, batches and learning rate (one value for all, not tuned for any). Then each is evaluated on the same held-out
text cut into windows of every evaluation length, from the training length up to 8x it: the same tokens each time,
so a change of perplexity with length comes from the context the model can use (or mishandles), nothing else. The
Transformer's window covers the longest evaluation length (full attention everywhere); its rotary positions beyond
the training length are unseen, which is what length generalisation tests. A finished variant is not retrained
when the command is run again (its run directory is reused), so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..configuration_bmojo import V0_OPTIONS
from ..data import STDLIB, load_corpus
from ..tokenization import load_tokenizer
from ..training import MetricsLog, train
from .variants import LABELS, VARIANTS, base_fields, matched_configs, parameter_count


@dataclass
class CompareConfig:
    """A small model (about 1.35M parameters) so that five runs fit in about 25 minutes on one CPU thread."""

    data: list[str] = field(default_factory=lambda: [STDLIB])
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    window: int = 32
    chunk: int = 16
    memory_size: int = 16
    selections_per_chunk: int = 2
    ssm_state_size: int = 16
    ssm_head_dim: int = 32
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 1e-3
    eval_lengths: tuple[int, ...] = (128, 256, 512, 1024)
    eval_tokens: int = 32768  # held-out tokens, the same at every length
    eval_batch_tokens: int = 8192
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS


QUICK = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    window=8,
    chunk=4,
    memory_size=4,
    ssm_state_size=8,
    ssm_head_dim=16,
    seq_len=16,
    batch_size=4,
    steps=3,
    eval_lengths=(16, 32),
    eval_tokens=256,
    eval_batch_tokens=128,
)


def model_configs(cmp: CompareConfig, vocab_size: int) -> dict:
    full_window = cmp.chunk * math.ceil(max(cmp.eval_lengths) / cmp.chunk)
    return matched_configs(cmp.variants, base_fields(cmp, vocab_size), full_window)


# The fields a variant sets; the special-token ids and the rest follow `bmojo train`'s defaults for the tokenizer.
VARIANT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "layers_block_type",
    "window_size",
    "chunk_size",
    "use_fading",
    "memory_size",
    "selections_per_chunk",
    "ssm_state_size",
    "ssm_head_dim",
    *V0_OPTIONS,  # the issue-11 options: a run made under other defaults is not taken for this one
)


@torch.no_grad()
def perplexity_by_length(model, tokens: torch.Tensor, lengths, batch_tokens: int) -> dict[int, float]:
    """``tokens [N, Lmax]``: for each length ``L`` (dividing ``Lmax``), the perplexity of the same tokens cut into
    windows of ``L`` (each window predicted from its own tokens only)."""
    model.eval()
    result = {}
    for length in lengths:
        windows = tokens.reshape(-1, length)
        per = max(1, batch_tokens // length)
        total = 0.0
        for start in range(0, len(windows), per):
            x = windows[start : start + per]
            total += model(input_ids=x, labels=x).lm_loss.item() * len(x)
        result[length] = math.exp(total / len(windows))
    return result


# Parts of a trained B'MOJO switched off at evaluation (same weights): what each memory contributes.
ABLATIONS = {
    "without eidetic memory": dict(memory_size=0),
    # the fading memory includes the self fading key f_i (fading_self_key, on by default)
    "without fading memory": dict(use_fading=False, fading_self_key=False),
    "without either (SWA)": dict(memory_size=0, use_fading=False, fading_self_key=False),
}


def ablated(model, change: dict):
    """``model`` rebuilt with ``change`` to its config and the weights it still uses."""
    config = model.config.__class__.from_dict({**model.config.to_dict(), **change})
    smaller = type(model)(config)
    missing, _ = smaller.load_state_dict(model.state_dict(), strict=False)  # the switched-off parts' weights go unused
    if missing:
        raise ValueError(f"switching off {change} needs weights the model lacks: {missing}")
    return smaller


def compare(cmp: CompareConfig, runs: Path, out: Path, threads: int, command: str) -> dict:
    lmax = max(cmp.eval_lengths)
    if any(lmax % length for length in cmp.eval_lengths) or cmp.seq_len not in cmp.eval_lengths:
        raise ValueError(f"eval_lengths {cmp.eval_lengths} must divide the longest and include seq_len {cmp.seq_len}")
    tokenizer = load_tokenizer("byte")
    vocab = -(-tokenizer.vocab_size // 8) * 8
    configs = model_configs(cmp, vocab)
    # Held-out text: the validation windows of the corpus cut at the longest length. Training samples windows of
    # seq_len from the training split of the corpus cut at seq_len; the two splits are drawn independently, so a
    # little of this text may have been trained on, equally for every variant.
    corpus = load_corpus(cmp.data, tokenizer, lmax, val_fraction=0.01)
    count = cmp.eval_tokens // lmax
    if len(corpus.val_windows) < count:
        raise ValueError(f"the data holds {len(corpus.val_windows)} held-out windows of {lmax}, {count} are needed")
    held_out = corpus.batch(corpus.val_windows[:count])
    results = {"command": command, "settings": asdict(cmp), "held_out_tokens": held_out.numel(), "variants": {}}
    for name, config in configs.items():
        run = runs / name
        overrides = {key: getattr(config, key) for key in VARIANT_FIELDS}
        settings = dict(
            data=cmp.data,
            out=str(run),
            seq_len=cmp.seq_len,
            batch_size=cmp.batch_size,
            steps=cmp.steps,
            lr=cmp.lr,
            warmup_steps=max(1, cmp.steps // 20),
            seed=cmp.seed,
            threads=threads,
            eval_every=0,
            save_every=0,
            sample_tokens=40,
        )
        train(None, overrides, settings, resume=bool(ckpt.list_checkpoints(run)))
        records = MetricsLog(run / "metrics.jsonl").read()
        last = [r for r in records if r["split"] == "train"][-1]
        val = [r for r in records if r["split"] == "val"][-1]
        model = ckpt.load_model(ckpt.list_checkpoints(run)[-1])
        by_length = perplexity_by_length(model, held_out, cmp.eval_lengths, cmp.eval_batch_tokens)
        if name == "bmojo":
            results["ablations"] = {}
            for label, change in ABLATIONS.items():
                ppl = perplexity_by_length(ablated(model, change), held_out, cmp.eval_lengths, cmp.eval_batch_tokens)
                results["ablations"][label] = {str(k): v for k, v in ppl.items()}
        results["variants"][name] = {
            "parameters": parameter_count(config),
            "train_tokens": cmp.steps * cmp.batch_size * cmp.seq_len,
            "val_perplexity": val["perplexity"],
            "perplexity_by_length": {str(k): v for k, v in by_length.items()},
            "final_train_lm_loss": last["lm_loss"],
            # from the training log, so it survives a rerun that reuses the run (not a benchmark: see throughput)
            "train_tokens_per_s": last["tokens_per_s"],
        }
        print(f"{LABELS[name]:12s} " + " ".join(f"L={k}: {v:.3f}" for k, v in by_length.items()), flush=True)
    write_report(results, out)
    return results


def write_report(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure  # the object API: no GUI backend, no global state

    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.json").write_text(json.dumps(results, indent=2))
    s = results["settings"]
    lengths = [str(length) for length in s["eval_lengths"]]
    first = next(iter(results["variants"].values()))
    lines = [
        "# Language modelling at equal parameters and tokens",
        "",
        f"Regenerate: `{results['command']}`.",
        "",
        f"Byte-level LM on {', '.join(s['data'])}; d={s['hidden_size']}, {s['num_layers']} layers, window "
        f"{s['window']}, chunk {s['chunk']}, eidetic memory {s['memory_size']}; {s['steps']} steps of "
        f"{s['batch_size']} x {s['seq_len']} tokens ({first['train_tokens']:,} tokens), lr {s['lr']:g} for every "
        f"variant. Perplexity (per byte) on the same {results['held_out_tokens']:,} held-out tokens cut into "
        f"windows of each length; the models were trained at {s['seq_len']}.",
        "",
        "| variant | parameters | "
        + " | ".join(f"ppl @ {length}" for length in lengths)
        + f" | ppl @ {lengths[-1]} / @ {lengths[0]} |",
        "|---" * (3 + len(lengths)) + "|",
    ]
    for name, v in results["variants"].items():
        ppl = v["perplexity_by_length"]
        lines.append(
            f"| {LABELS[name]} | {v['parameters']:,} | "
            + " | ".join(f"{ppl[length]:.3f}" for length in lengths)
            + f" | {ppl[lengths[-1]] / ppl[lengths[0]]:.3f} |"
        )
    if "ablations" in results:
        lines += [
            "",
            "The trained B'MOJO with a memory switched off at evaluation (same weights, same tokens):",
            "",
            "| B'MOJO | " + " | ".join(f"ppl @ {length}" for length in lengths) + " |",
            "|---" * (1 + len(lengths)) + "|",
            "| as trained | "
            + " | ".join(f"{results['variants']['bmojo']['perplexity_by_length'][x]:.3f}" for x in lengths)
            + " |",
        ]
        for label, ppl in results["ablations"].items():
            lines.append(f"| {label} | " + " | ".join(f"{ppl[x]:.3f}" for x in lengths) + " |")
    (out / "lm.md").write_text("\n".join(lines) + "\n\n![perplexity vs evaluation length](lm.png)\n")

    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for name, v in results["variants"].items():
        ppl = v["perplexity_by_length"]
        ax.plot([int(x) for x in lengths], [ppl[x] for x in lengths], marker="o", label=LABELS[name])
    ax.axvline(s["seq_len"], color="grey", linestyle=":", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out / "lm.png", dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs", help="folder for lm.json, lm.md, lm.png (default: docs)")
    parser.add_argument("--runs", default="runs/lm_compare", help="folder for the five training runs")
    parser.add_argument("--data", nargs="+", default=[STDLIB], help="training and held-out text (default: stdlib)")
    parser.add_argument("--quick", action="store_true", help="a tiny comparison (seconds), for smoke tests")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {CompareConfig.steps})")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else {}, **({"steps": args.steps} if args.steps else {}))
    cmp = CompareConfig(**settings, data=args.data, variants=tuple(args.variants))
    command = "python -m bmojo.evals.lm_compare" + (" --quick" if args.quick else "")
    command += f" --threads {args.threads}" if args.threads else ""
    command += f" --steps {args.steps}" if args.steps else ""
    command += f" --data {' '.join(args.data)}" if args.data != [STDLIB] else ""
    compare(cmp, Path(args.runs), Path(args.out), args.threads, command + f" --out {args.out}")


if __name__ == "__main__":
    main()
