"""Seconds per training step of a preset (forward, backward, AdamW), for side-by-side comparisons of two source
trees on one machine: run it alternately with ``PYTHONPATH=<tree>/src`` for each tree, a few rounds, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/bench_step.py --preset cpu --length 2048 --steps 6

Prints one JSON line: the package it imported (so a comparison can check which tree ran), the preset, the length,
the median step in seconds and every step's seconds (after one warm-up step).
"""

import argparse
import json
import statistics
import time

import torch

import bmojo
from bmojo import BMojoForCausalLM, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sequence (batch 1)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up step")
    args = parser.parse_args()
    if args.length < 1 or args.steps < 1:
        parser.error("--length and --steps must be positive")
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config(args.preset))
    ids = torch.randint(0, model.config.vocab_size, (1, args.length))
    optimizer = torch.optim.AdamW(model.parameters())

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    print(json.dumps(dict(package=bmojo.__file__, preset=args.preset, length=args.length,
                          median_s=round(statistics.median(seconds), 4), steps_s=[round(s, 4) for s in seconds])))


if __name__ == "__main__":
    main()
