"""Does the chunked model scale linearly? Forward+backward time at L = 1K, 2K, 4K, 8K, side by side in one run.

    python scripts/bench_scaling.py                  # the "cpu" preset, every feature on
    python scripts/bench_scaling.py --preset tiny --lengths 512 1024 2048
    python scripts/bench_scaling.py --op ssd --batch-size 2     # the chunked SSD op alone, at the preset's sizes

Prints the time per length and the ratio to the previous length; with a fixed window each doubling of L
should cost about 2x (a quadratic slip would show 4x). Times are the median of --repeats runs. ``--op ssd`` times
the chunked SSD scan alone (forward, backward, and backward/forward, which must not grow with L).
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
    parser.add_argument("--op", choices=["model", "ssd"], default="model", help="the whole model, or the SSD op alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset_config(args.preset)
    if args.op == "ssd":
        return ssd_scaling(config, args)
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


def ssd_scaling(config, args) -> None:
    """Forward and backward time of ``ssd_chunked`` at the preset's SSD sizes, per length (median of repeats)."""
    from bmojo.ops.ssd.chunk import ssd_chunked

    heads, groups = config.ssm_num_heads, config.ssm_ngroups
    head_dim, state = config.ssm_head_dim, config.ssm_state_size
    chunk = getattr(config, "ssd_chunk_size", None) or config.chunk_size
    print(f"ssd_chunked: batch {args.batch_size}, heads {heads}, groups {groups}, P={head_dim}, N={state}, "
          f"chunk {chunk}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'L':>6} {'fwd (ms)':>9} {'bwd (ms)':>9} {'bwd/fwd':>8}")
    for length in args.lengths:
        b = args.batch_size
        leaf = lambda *shape: torch.randn(*shape).requires_grad_()
        x, bb, cc = leaf(b, length, heads, head_dim), leaf(b, length, groups, state), leaf(b, length, groups, state)
        dt = (0.1 * torch.rand(b, length, heads)).requires_grad_()
        a = -torch.rand(heads) - 0.5
        fwd, bwd = [], []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            y, _ = ssd_chunked(x, dt, a, bb, cc, chunk)
            loss = y.square().sum()
            mid = time.perf_counter()
            loss.backward()
            fwd.append(mid - start)
            bwd.append(time.perf_counter() - mid)
        f, w = statistics.median(fwd[1:]), statistics.median(bwd[1:])
        print(f"{length:>6} {1e3 * f:>9.0f} {1e3 * w:>9.0f} {w / f:>8.2f}")


if __name__ == "__main__":
    main()
