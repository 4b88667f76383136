"""MQAR sweep: Transformer, SWA, Mamba-2, B'MOJO-F and B'MOJO at equal parameter count, zoology-style.

    python -m bmojo.evals.mqar_sweep                      # the full sweep -> docs/mqar.{json,md,png}
    python -m bmojo.evals.mqar_sweep --quick --out /tmp/q  # a smoke run (what the test suite runs)

Every variant is trained on the same MQAR data for the same number of steps at each learning rate of one small
grid, and its best learning rate (by mean test accuracy) is reported, as zoology does. Parameter counts are
equalised by widening the MLP of the smaller variants (within 10% of B'MOJO's count, checked). Test sets: the
standard MQAR at several numbers of key-value pairs, and the long-gap variant whose queried pairs all lie beyond
window + fading span.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..configuration_bmojo import V0_OPTIONS, BMojoConfig
from ..modeling_bmojo import BMojoForCausalLM
from . import variants
from .mqar import mqar_accuracy, multiquery_ar
from .variants import LABELS, VARIANTS, parameter_count


@dataclass
class SweepConfig:
    """Sized for a 2-core CPU (about 80 minutes on one thread). zoology trains ~20k steps at V=8192; this budget is
    3,000 steps (two epochs), so V is small (keys from 63 tokens) and the grid is zoology's top three learning rates."""

    vocab_size: int = 128
    seq_len: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    window: int = 8
    chunk: int = 4
    memory_size: int = 16
    selections_per_chunk: int = 2
    ssm_state_size: int = 16
    ssm_head_dim: int = 16
    train_pairs: tuple[int, ...] = (4, 8, 16)
    train_examples: int = 48000
    test_pairs: tuple[int, ...] = (2, 4, 8, 12, 16)
    long_gap_pairs: tuple[int, ...] = (2, 4, 8)
    test_examples: int = 500
    batch_size: int = 32
    epochs: int = 2
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    weight_decay: float = 0.1
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS
    extra: dict = field(default_factory=dict)

    @property
    def long_gap(self) -> int:
        return 2 * self.window + 2 * self.chunk  # every query sits beyond window + fading span


QUICK = dict(
    vocab_size=256,
    seq_len=64,
    hidden_size=32,
    window=8,
    chunk=4,
    memory_size=8,
    train_pairs=(4, 8),
    train_examples=96,
    test_pairs=(4, 8),
    long_gap_pairs=(4,),
    test_examples=16,
    batch_size=16,
    epochs=1,
    lrs=(3e-3,),
)


def matched_configs(sweep: SweepConfig) -> dict[str, BMojoConfig]:
    """The sweep's variants at equal parameters; the Transformer's window covers the whole input."""
    full_window = sweep.chunk * math.ceil(sweep.seq_len / sweep.chunk)
    return variants.matched_configs(sweep.variants, variants.base_fields(sweep, sweep.vocab_size), full_window)


def _batches(inputs, labels, batch_size, generator):
    order = torch.randperm(len(inputs), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield inputs[idx], labels[idx]


def train_and_evaluate(cfg: BMojoConfig, lr: float, sweep: SweepConfig, train, tests, progress=None) -> dict:
    started = time.time()
    torch.manual_seed(sweep.seed)
    model = BMojoForCausalLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=sweep.weight_decay)
    steps = sweep.epochs * (len(train[0]) // sweep.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(sweep.seed)
    losses = []
    model.train()
    for _ in range(sweep.epochs):
        for x, y in _batches(*train, sweep.batch_size, generator):
            out = model(input_ids=x)
            # MQAR labels are aligned with the inputs (the target of position i is labels[i]): no shift.
            loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100)
            if out.innovation_loss is not None:
                loss = loss + cfg.innovation_loss_weight * out.innovation_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress.update(1)
    model.eval()
    accuracy = {}
    with torch.no_grad():
        for key, (x, y) in tests.items():
            accuracy[key] = float(
                torch.cat(
                    [mqar_accuracy(model(input_ids=xb).logits, yb) for xb, yb in zip(x.split(64), y.split(64))]
                ).mean()
            )
    return {
        "lr": lr,
        "seconds": time.time() - started,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "accuracy": accuracy,
        "steps": steps,
    }


def make_data(sweep: SweepConfig):
    per = sweep.train_examples // len(sweep.train_pairs)
    parts = [
        multiquery_ar(sweep.vocab_size, per, sweep.seq_len, seed=sweep.seed + i, num_kv_pairs=p)
        for i, p in enumerate(sweep.train_pairs)
    ]
    train = (torch.cat([p.inputs for p in parts]), torch.cat([p.labels for p in parts]))
    tests = {}
    for i, p in enumerate(sweep.test_pairs):
        b = multiquery_ar(sweep.vocab_size, sweep.test_examples, sweep.seq_len, seed=10_000 + i, num_kv_pairs=p)
        tests[f"kv={p}"] = (b.inputs, b.labels)
    for i, p in enumerate(sweep.long_gap_pairs):
        b = multiquery_ar(
            sweep.vocab_size, sweep.test_examples, sweep.seq_len, seed=20_000 + i, num_kv_pairs=p, gap=sweep.long_gap
        )
        tests[f"long-gap kv={p}"] = (b.inputs, b.labels)
    return train, tests


def options(config) -> dict | None:
    """A variant's issue-11 option values (recorded with each run; None for a variant not in this sweep)."""
    return None if config is None else {name: getattr(config, name) for name in V0_OPTIONS}


def run_sweep(sweep: SweepConfig, out: Path, command: str) -> dict:
    """Train every (variant, learning rate) pair. Each finished run is appended to ``out/mqar.partial.jsonl`` at
    once, and a restarted sweep with the same settings skips the runs found there: a crash loses one run at most."""
    from tqdm import tqdm

    configs = matched_configs(sweep)
    train, tests = make_data(sweep)
    steps = sweep.epochs * (len(train[0]) // sweep.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "mqar.partial.jsonl"
    settings = asdict(sweep)
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            record = json.loads(line) if line.strip() else None
            # same settings and the same model (the issue-11 options: records from under other defaults are redone)
            if record and record["sweep"] == json.loads(json.dumps(settings)) and record.get("options") == options(
                configs.get(record["variant"])
            ):
                done[(record["variant"], record["run"]["lr"])] = record["run"]
    results = {"command": command, "sweep": settings, "long_gap": sweep.long_gap, "variants": {}}
    with tqdm(total=steps * len(configs) * len(sweep.lrs), desc="mqar sweep", unit="step") as progress:
        for name, cfg in configs.items():
            runs = []
            for lr in sweep.lrs:
                if (name, lr) in done:
                    runs.append(done[(name, lr)])
                    progress.update(steps)
                    continue
                run = train_and_evaluate(cfg, lr, sweep, train, tests, progress)
                with open(partial, "a") as f:
                    record = {"sweep": settings, "variant": name, "options": options(cfg), "run": run}
                    f.write(json.dumps(record) + "\n")
                runs.append(run)
            best = max(runs, key=lambda r: sum(r["accuracy"].values()))
            results["variants"][name] = {"parameters": parameter_count(cfg), "best": best, "runs": runs}
    results["seconds"] = sum(run["seconds"] for v in results["variants"].values() for run in v["runs"])
    write_report(results, out)
    partial.unlink()
    return results


def write_report(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure  # the object API: no GUI backend, no global state

    out.mkdir(parents=True, exist_ok=True)
    (out / "mqar.json").write_text(json.dumps(results, indent=2))
    sweep = results["sweep"]
    keys = list(next(iter(results["variants"].values()))["best"]["accuracy"])
    lines = [
        "# MQAR: accuracy at equal parameters",
        "",
        f"Regenerate: `{results['command']}` ({results['seconds'] / 60:.0f} min on this machine).",
        "",
        f"Sequence length {sweep['seq_len']}, vocabulary {sweep['vocab_size']}, d={sweep['hidden_size']}, "
        f"{sweep['num_layers']} layers, window {sweep['window']}, chunk {sweep['chunk']}, eidetic memory "
        f"{sweep['memory_size']} slots ({sweep['selections_per_chunk']} picks per chunk). Trained on "
        f"{sweep['train_examples']} examples with {list(sweep['train_pairs'])} pairs for {sweep['epochs']} epochs; "
        f"best learning rate of {list(sweep['lrs'])} per variant. Long gap: {results['long_gap']} filler tokens "
        "between the pairs and the queries (beyond window + fading span).",
        "",
        "| variant | parameters | best lr | " + " | ".join(keys) + " |",
        "|---" * (3 + len(keys)) + "|",
    ]
    for name, v in results["variants"].items():
        acc = v["best"]["accuracy"]
        lines.append(
            f"| {LABELS[name]} | {v['parameters']:,} | {v['best']['lr']:g} | "
            + " | ".join(f"{acc[k]:.3f}" for k in keys)
            + " |"
        )
    (out / "mqar.md").write_text("\n".join(lines) + "\n\n![MQAR accuracy](mqar.png)\n")

    fig = Figure(figsize=(10, 4), layout="tight")
    axes = fig.subplots(1, 2)
    standard = [k for k in keys if k.startswith("kv=")]
    gap = [k for k in keys if k.startswith("long-gap")]
    for name, v in results["variants"].items():
        acc = v["best"]["accuracy"]
        axes[0].plot([int(k[3:]) for k in standard], [acc[k] for k in standard], marker="o", label=LABELS[name])
        if gap:
            axes[1].plot([int(k.split("=")[1]) for k in gap], [acc[k] for k in gap], marker="o", label=LABELS[name])
    axes[0].set_title("MQAR")
    axes[1].set_title(f"MQAR, queries {results['long_gap']} tokens after the pairs")
    for ax in axes:
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(out / "mqar.png", dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs", help="folder for mqar.json, mqar.md, mqar.png")
    parser.add_argument("--quick", action="store_true", help="a tiny sweep (seconds), for smoke tests")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs (a longer-budget follow-up)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="override the learning-rate grid")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(QUICK if args.quick else {})
    overrides.update({k: v for k, v in (("epochs", args.epochs), ("lrs", tuple(args.lrs or ()))) if v})
    sweep = SweepConfig(**overrides, seed=args.seed, variants=tuple(args.variants))
    command = " ".join(
        ["python -m bmojo.evals.mqar_sweep", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]
    )
    results = run_sweep(sweep, Path(args.out), command)
    for name, v in results["variants"].items():
        print(
            f"{LABELS[name]:12s} lr={v['best']['lr']:g} "
            + " ".join(f"{k}:{a:.3f}" for k, a in v["best"]["accuracy"].items())
        )


if __name__ == "__main__":
    main()
