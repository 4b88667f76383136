"""Time the eidetic memory's two forms, forward + backward: the closed form (no per-chunk loop) against the scan
(one merge per chunk), through ``select_per_chunk`` (top-k, taking the picks, the memory) at the ``cpu`` preset's
shapes (C=32, k=2, M=32, F = 4 kv heads x 64), batch 2, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_memory_per_chunk.py [--lengths 2048 8192] [--reps 5]

Prints the median milliseconds of CPU time of this thread (``time.thread_time``: less disturbed by other
processes on a shared machine than wall time) per form and length; the forms are interleaved per round."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bmojo.ops.selection.chunk as chunk_mod


def step(scores, k, v, w, form_limit, **options):
    chunk_mod.CLOSED_FORM_MAX_PICKS = form_limit
    _, seen = chunk_mod.select_per_chunk(scores, k, v, 32, 2, 32, **options)
    loss = (torch.where(seen.valid[..., None], seen.k * w + seen.v * w, 0)).sum()
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--decay", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    limit = chunk_mod.CLOSED_FORM_MAX_PICKS
    for length in args.lengths:
        g = torch.Generator().manual_seed(0)
        scores = torch.rand(2, length, generator=g)
        k = torch.randn(2, length, 256, generator=g, requires_grad=True)
        v = torch.randn(2, length, 256, generator=g, requires_grad=True)
        w = torch.randn(2, length // 32, 32, 256, generator=g)
        forms = {"closed": 10**9, "scan": 0}
        times = {name: [] for name in forms}
        for _ in range(args.reps + 1):  # the first round warms up
            for name, form_limit in forms.items():
                start = time.thread_time()
                step(scores, k, v, w, form_limit, decay=args.decay)
                times[name].append(time.thread_time() - start)
        ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
        print(f"L={length:6d}  closed {ms['closed']:8.1f} ms  scan {ms['scan']:8.1f} ms  "
              f"scan/closed {ms['scan'] / ms['closed']:.2f}  (decay {args.decay})", flush=True)  # fmt: skip
    chunk_mod.CLOSED_FORM_MAX_PICKS = limit


if __name__ == "__main__":
    main()
