"""Does the chunked model scale linearly? Forward+backward time at L = 1K, 2K, 4K, 8K, side by side in one run.

    python scripts/bench_scaling.py                  # the "cpu" preset, every feature on
    python scripts/bench_scaling.py --preset tiny --lengths 512 1024 2048

Prints the time per length and the ratio to the previous length; with a fixed window each doubling of L
should cost about 2x (a quadratic slip would show 4x). Times are the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bmojo import BMojoForCausalLM, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset_config(args.preset)
    model = BMojoForCausalLM(config)
    print(
        f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"layers {config.layers_block_type}, W={config.window_size}, C={config.chunk_size}, M={config.memory_size}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'L':>6} {'fwd+bwd (s)':>12} {'x previous':>11} {'tokens/s':>9}")
    previous = None
    for length in args.lengths:
        x = torch.randint(0, config.vocab_size, (args.batch_size, length))
        times = []
        for _ in range(args.repeats + 1):  # the first run warms up allocators
            start = time.perf_counter()
            model(x, labels=x).loss.backward()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        t = statistics.median(times[1:])
        ratio = f"{t / previous:.2f}" if previous else "-"
        print(f"{length:>6} {t:>12.3f} {ratio:>11} {args.batch_size * length / t:>9.0f}")
        previous = t


if __name__ == "__main__":
    main()
