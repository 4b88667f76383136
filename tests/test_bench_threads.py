"""scripts/bench_threads.py: the process that loads one core while the benchmark runs ends with the benchmark, also
when the benchmark is killed outright (its ``finally`` never runs)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_threads.py"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # gone (and reaped)
        return False
    return state not in ("Z", "X")  # a zombie has stopped; only its exit status is left to reap


def test_the_busy_core_loop_stops_when_the_benchmark_is_killed():
    start = (
        "import importlib.util as u, os, subprocess, sys, time\n"
        f"s = u.spec_from_file_location('b', {str(SCRIPT)!r}); b = u.module_from_spec(s); s.loader.exec_module(b)\n"
        "p = subprocess.Popen([sys.executable, '-c', b.busy_source(os.getpid())])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    benchmark = subprocess.Popen([sys.executable, "-c", start], stdout=subprocess.PIPE, text=True)
    busy = int(benchmark.stdout.readline())
    try:
        time.sleep(2)
        assert _alive(busy)  # it loops while the benchmark lives
        benchmark.send_signal(signal.SIGKILL)
        benchmark.wait()
        deadline = time.time() + 60
        while _alive(busy) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(busy)
    finally:
        if _alive(busy):
            os.kill(busy, signal.SIGKILL)
