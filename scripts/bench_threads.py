"""Seconds per step of the default `bmojo train` (the 'cpu' preset, 8 x 256 bytes, AdamW) under thread settings,
on an idle machine and with one busy core, to choose ``bmojo.processes.default_threads``.

    python scripts/bench_threads.py --reps 3 --steps 3      # a Markdown table: median (best) over the reps

Each measurement is a fresh process (``OMP_WAIT_POLICY`` is read when torch loads OpenMP), one warm-up step, then
``--steps`` timed steps (fewer if ``--budget`` seconds run out). "busy core" runs a one-thread torch matmul loop
beside it. The configurations are interleaved within each repetition, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "2 threads (spinning OpenMP)": dict(threads=2, env={}),
    "1 thread": dict(threads=1, env={}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": dict(threads=2, env={"OMP_WAIT_POLICY": "PASSIVE"}),
}


def busy_source(parent_pid: int) -> str:
    """A one-thread matmul loop that keeps one core busy until its parent (this script) is gone: a benchmark killed
    outright (SIGKILL, or a SIGTERM that skips the ``finally``) must not leave a core spinning forever."""
    return (
        "import os, torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\n"
        f"while os.getppid() == {parent_pid}:\n    a @ a"
    )


def one_run(threads: int, steps: int, budget: float) -> float:
    import torch

    from bmojo import BMojoForCausalLM, preset_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=7e-4)
    x = torch.randint(0, 256, (8, 256))
    times = []
    start = time.perf_counter()
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i:
            times.append(time.perf_counter() - t)
        if i and time.perf_counter() - start > budget:
            break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per measurement before stopping early")
    parser.add_argument("--one", nargs=3, metavar=("THREADS", "STEPS", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(int(args.one[0]), int(args.one[1]), float(args.one[2]))))
        return
    results: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for load in ("idle", "one busy core"):
            busy = subprocess.Popen([sys.executable, "-c", busy_source(os.getpid())]) if load != "idle" else None
            try:
                time.sleep(1.0 if busy else 0.0)
                for name, cfg in CONFIGS.items():
                    env = {**os.environ, **cfg["env"]}
                    command = [
                        sys.executable,
                        __file__,
                        "--one",
                        str(cfg["threads"]),
                        str(args.steps),
                        str(args.budget),
                    ]
                    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                    seconds = json.loads(out.strip().splitlines()[-1])
                    results.setdefault((name, load), []).append(seconds)
                    print(f"rep {rep}: {name:36s} {load:14s} {seconds:7.2f} s/step", file=sys.stderr, flush=True)
            finally:
                if busy:
                    busy.kill()
                    busy.wait()
    print(f"| threads | s/step, no extra load: median (best) of {args.reps} | with one busy core: median (best) |")
    print("|---|---|---|")
    for name in CONFIGS:
        cells = [results[name, load] for load in ("idle", "one busy core")]
        print(f"| {name} | " + " | ".join(f"{statistics.median(c):.2f} ({min(c):.2f})" for c in cells) + " |")


if __name__ == "__main__":
    main()
