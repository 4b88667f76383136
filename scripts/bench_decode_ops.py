"""Ops and time per decoded token: the top-level aten ops one decoding step dispatches (``torch.profiler``) and the
median wall time of a step, at given context lengths. A decoding step of a small model on a CPU is bound by the
count of its ops (issue 12), and both must be flat in the context (the state has a fixed size).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_decode_ops.py --preset cpu --contexts 1024 8192 --rounds 5

The cache is an empty one set to the context's position (a step's work does not depend on what the fixed-size state
holds). Prints one JSON line per context: ``ops`` (per token), ``ops_by_name`` (the most frequent), ``ms`` (median
over ``rounds`` rounds of ``tokens`` steps each, per token).
"""

import argparse
import collections
import json
import statistics
import time

import torch

from bmojo import BMojoForCausalLM, preset_config
from bmojo.cache import BMojoCache


def top_level_aten_ops(model, cache, token, steps: int = 2) -> collections.Counter:
    """Per step: the aten ops of ``steps`` decoding steps that no other aten op called, by name."""
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            model(input_ids=token, cache=cache)
    counts = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return collections.Counter({name: n / steps for name, n in counts.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset_config(args.preset)
    model = BMojoForCausalLM(config).eval()
    token = torch.randint(3, config.vocab_size, (1, 1))
    with torch.no_grad():
        for context in args.contexts:
            cache = BMojoCache.empty(config, 1)
            cache.positions.fill_(context)
            for _ in range(3):  # warm up
                model(input_ids=token, cache=cache)
            ops = top_level_aten_ops(model, cache, token)
            rounds = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(args.tokens):
                    model(input_ids=token, cache=cache)
                rounds.append((time.perf_counter() - start) * 1e3 / args.tokens)
            print(json.dumps({
                "preset": args.preset, "context": context, "threads": args.threads, "ops": sum(ops.values()),
                "ms": round(statistics.median(rounds), 3), "ms_rounds": [round(r, 3) for r in rounds],
                "ops_by_name": dict(ops.most_common(40)),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
