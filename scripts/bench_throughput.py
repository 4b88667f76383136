"""Throughput side by side, in one run: B'MOJO vs its Transformer and Mamba-2 special cases and vs transformers'
own LlamaForCausalLM and Mamba2ForCausalLM, all at (about) equal parameter counts, on this CPU.

    python scripts/bench_throughput.py                         # writes docs/throughput.{md,json,png}
    python scripts/bench_throughput.py --contexts 1024 2048 --quick

Measures
* training tokens/s: forward + backward + AdamW step at ``--train-length`` (rounds interleave the models, so
  machine noise hits them alike; the median per model is reported);
* decode ms/token after a context of 1K ... 16K tokens, and the bytes of decoding state at that point.

How the decoding state is set up: B'MOJO's and our special cases' caches have static shapes, so decoding cost
does not depend on the values held; their cache is created empty and moved to position ``t``. (Our Transformer
special case keeps a ring of ``W = t`` slots: a Transformer must hold the whole context.) transformers' models
get a real prefill of ``t`` tokens (Llama in 2K-token pieces, so its attention fits in memory).

Only ratios are meant to be quoted: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from bmojo import BMojoCache, BMojoForCausalLM, preset_config
from bmojo.evals.peers import llama_config, mamba2_config


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(contexts, train_length):
    """Name -> (factory(window) -> model, kind). Factories take the attention window our Transformer needs."""
    base = preset_config("cpu")
    target = count(BMojoForCausalLM(base))

    def ours(window=None, **overrides):
        cfg = preset_config("cpu", **overrides)
        if window is not None:
            cfg.window_size = window
        return BMojoForCausalLM(cfg)

    # Transformer special case: attention layers with W covering the input; MLP widened to equal parameters.
    attn = dict(layers_block_type=["attention"] * base.num_hidden_layers)
    width = 64 * round(base.intermediate_size * target / count(ours(**attn)) / 64)
    while count(ours(**attn, intermediate_size=width)) < target:
        width += 64
    attn["intermediate_size"] = width
    # Mamba-2 special case: SSM layers without MLP (Mamba-2's own block), deep enough for equal parameters.
    depth = 1
    while count(ours(num_hidden_layers=depth + 1, layers_block_type=["ssm"] * (depth + 1), use_mlp=False)) <= target:
        depth += 1
    ssm = dict(num_hidden_layers=depth, layers_block_type=["ssm"] * depth, use_mlp=False)

    def llama(window=None):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(ours(**attn).config, max(contexts + [train_length]) + 64))

    def mamba2(window=None):
        from transformers import Mamba2ForCausalLM

        return Mamba2ForCausalLM(mamba2_config(ours(**ssm).config))

    return {
        "B'MOJO": (lambda window=None: ours(), "ours"),
        "B'MOJO Transformer case": (lambda window=None: ours(window, **attn), "ours"),
        "B'MOJO Mamba-2 case": (lambda window=None: ours(**ssm), "ours"),
        "transformers Llama": (llama, "hf_attention"),
        "transformers Mamba2": (mamba2, "hf_ssm"),
    }


def train_tokens_per_s(models, length, batch, rounds, vocab):
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times = {name: [] for name in models}
    for r in range(rounds + 1):  # round 0 warms up
        x = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(r))
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: batch * length / statistics.median(t) for name, t in times.items()}


def state_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a cache object (works across transformers versions)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(state_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(state_bytes(o, seen) for k, o in vars(obj).items() if k != "config")
    return 0


@torch.no_grad()
def decoder(factory, kind, context, steps, vocab):
    """(one-token step function, its cache, the token) for a model whose state holds ``context`` tokens."""
    model = factory(window=max(context + steps, 32)).eval()
    token = torch.randint(3, vocab, (1, 1))
    if kind == "ours":
        cache = BMojoCache.empty(model.config, 1)
        cache.positions.fill_(context)
        run = lambda t: model(input_ids=t, cache=cache)  # noqa: E731
        model(input_ids=token, cache=cache)  # warm-up
    else:
        prompt = torch.randint(3, vocab, (1, context))
        if kind == "hf_attention":
            out, cache = None, None
            for start in range(0, context, 2048):
                out = model(input_ids=prompt[:, start : start + 2048], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            run = lambda t: model(input_ids=t, past_key_values=cache, use_cache=True)  # noqa: E731
        else:
            out = model(input_ids=prompt, use_cache=True)
            cache = out.cache_params  # transformers Mamba2 (5.2x: an alias of .cache)
            position = [context]

            def run(t):
                result = model(
                    input_ids=t, cache_params=cache, use_cache=True, cache_position=torch.tensor([position[0]])
                )
                position[0] += 1
                return result

    return run, cache, token


@torch.no_grad()
def decode_ms_per_token(specs, context, steps, rounds, vocab):
    """Median ms/token of each model over ``rounds`` rounds of ``steps`` tokens; the rounds interleave the models,
    so machine noise hits them alike. Also the bytes of each model's decoding state."""
    setups = {name: decoder(factory, kind, context, steps * (rounds + 1), vocab) for name, (factory, kind) in specs.items()}
    times = {name: [] for name in specs}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (run, _, token) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                run(token)
            if r:
                times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}, {n: state_bytes(c) for n, (_, c, _) in setups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", default="docs", help="where throughput.{md,json,png} go")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.decode_steps = 1, 4
    torch.manual_seed(0)
    specs = build_models(args.contexts, args.train_length)
    vocab = preset_config("cpu").vocab_size
    models = {name: factory() for name, (factory, _) in specs.items()}
    params = {name: count(m) for name, m in models.items()}
    for name, n in params.items():
        print(f"{name:28s} {n / 1e6:6.2f}M parameters")
    train = train_tokens_per_s(models, args.train_length, args.train_batch, args.rounds, vocab)
    del models
    decode, nbytes = {n: {} for n in specs}, {n: {} for n in specs}
    for context in args.contexts:
        ms, size = decode_ms_per_token(specs, context, args.decode_steps, args.rounds, vocab)
        for name in specs:
            decode[name][context], nbytes[name][context] = ms[name], size[name]
            print(f"context {context:6d}  {name:28s} {ms[name]:8.2f} ms/token  {size[name] / 2**20:8.2f} MiB state")
    command = " ".join(["python scripts/bench_throughput.py", *map(shlex.quote, sys.argv[1:])])
    results = {
        "command": command,
        "threads": torch.get_num_threads(),
        "parameters": params,
        "train_tokens_per_s": train,
        "train_length": args.train_length,
        "decode_ms_per_token": decode,
        "state_bytes": nbytes,
    }
    write_report(results, Path(args.out))


def size_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def write_report(results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(results, indent=2))
    names = list(results["parameters"])
    ref = "B'MOJO"
    contexts = sorted(next(iter(results["decode_ms_per_token"].values())))
    lines = [
        "# Throughput on the CPU (ratios to B'MOJO)",
        "",
        f"Regenerate: `{results['command']}` ({results['threads']} thread(s)). Absolute times depend on the machine;",
        "quote the ratios. Ratio > 1 means that many times B'MOJO's value.",
        "",
        f"| model | parameters | training tokens/s (L={results['train_length']}) | "
        + " | ".join(f"decode ms/token @{size_label(c)}" for c in contexts)
        + " | "
        + " | ".join(f"state @{size_label(c)}" for c in contexts)
        + " |",
        "|---" * (3 + 2 * len(contexts)) + "|",
    ]
    train, decode, size = results["train_tokens_per_s"], results["decode_ms_per_token"], results["state_bytes"]
    for name in names:
        row = [name, f"{results['parameters'][name] / 1e6:.2f}M", f"{train[name] / train[ref]:.2f}×"]
        row += [f"{decode[name][c] / decode[ref][c]:.2f}×" for c in contexts]
        row += [f"{size[name][c] / size[ref][c]:.2f}×" for c in contexts]
        lines.append("| " + " | ".join(row) + " |")
    (out / "throughput.md").write_text("\n".join(lines) + "\n\n![decode](throughput.png)\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        axes[0].plot(contexts, [decode[name][c] for c in contexts], marker="o", label=name)
        axes[1].plot(contexts, [size[name][c] / 2**20 for c in contexts], marker="o", label=name)
    for ax, title in zip(axes, ["decode ms/token", "decoding state (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    print(f"wrote {out / 'throughput.md'}, {out / 'throughput.json'}, {out / 'throughput.png'}")


if __name__ == "__main__":
    main()
