"""Seconds per training step of a preset (forward, backward, AdamW), or the peak memory of its first step, for
side-by-side comparisons of two source trees on one machine: run it alternately with ``PYTHONPATH=<tree>/src`` for
each tree, a few rounds, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/bench_step.py --preset cpu --length 2048 --steps 6
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/bench_step.py --length 8192 --checkpointing \
        --selective-recompute --memory

Prints one JSON line: the package it imported (so a comparison can check which tree ran), the preset, the length,
the recompute forms, and either the median step in seconds and every step's seconds (after one warm-up step) or,
with ``--memory``, two peaks of the first step (the one that creates the optimizer state) above what was live
before it, in MiB:

* ``peak_resident_mib``: the process's resident peak, as ``bench_throughput.py --peak-memory`` measures it (glibc's
  mmap threshold fixed, ``VmHWM`` reset before the step; Linux). It counts everything the process maps — tensors,
  the allocators' and math libraries' buffers — and moves by ~±2% between runs of the same code.
* ``peak_tensor_mib``: the peak of the bytes held by live tensors, from the profiler's record of every allocation
  and free in the step (``torch.profiler`` with ``profile_memory=True``, ``export_memory_timeline``) on a fresh copy
  of the model: the same on every run; what the code itself keeps.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bmojo
from bmojo import BMojoForCausalLM, preset_config


def build(args):
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config(args.preset))
    if args.checkpointing:  # transformers 5.x's name; 4.57's is gradient_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if args.selective_recompute:
        model.selective_recompute_enable()
    return model, torch.optim.AdamW(model.parameters())


def train_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def peak_tensor_bytes(model, optimizer, ids) -> int:
    """The peak of live tensor bytes during one training step above those live before it (CPU), from the profiler's
    memory timeline (its JSON export: sample times and, per sample, bytes per category; the first sample holds the
    tensors that existed before the step, the weights). torch marks the export deprecated in favour of a CUDA-only
    API; it is the one that reads a CPU step."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        train_step(model, optimizer, ids)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(sample) for sample in sizes) - sum(sizes[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sequence (batch 1)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up step")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    parser.add_argument("--selective-recompute", action="store_true", help="recompute the attention and SSD ops")
    parser.add_argument("--memory", action="store_true", help="peak memory of the first step instead of seconds")
    args = parser.parse_args()
    if args.length < 1 or args.steps < 1:
        parser.error("--length and --steps must be positive")
    head = dict(package=bmojo.__file__, preset=args.preset, length=args.length, checkpointing=args.checkpointing,
                selective_recompute=args.selective_recompute)  # fmt: skip
    if args.memory:
        from bench_throughput import _status_bytes, fix_mmap_threshold, release_memory

        fix_mmap_threshold()
        model, optimizer = build(args)
        ids = torch.randint(0, model.config.vocab_size, (1, args.length))
        release_memory()
        before = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        train_step(model, optimizer, ids)
        resident = _status_bytes("VmHWM") - before
        del model, optimizer
        release_memory()
        model, optimizer = build(args)
        tensors = peak_tensor_bytes(model, optimizer, ids)
        print(json.dumps(dict(head, peak_resident_mib=round(resident / 2**20, 1),
                              peak_tensor_mib=round(tensors / 2**20, 1))))  # fmt: skip
        return
    model, optimizer = build(args)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length))
    train_step(model, optimizer, ids)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, ids)
        seconds.append(time.perf_counter() - start)
    print(json.dumps(dict(head, median_s=round(statistics.median(seconds), 4), steps_s=[round(s, 4) for s in seconds])))


if __name__ == "__main__":
    main()
