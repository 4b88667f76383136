"""The run directory ``<out>/`` of ``bmojo train``: its settings file (``train_config.yaml``), its metrics
(``metrics.jsonl``), its lock, the signals that stop a run, and what is written when a run starts and ends.

Safety rules (README, "Reliability"): one run at a time (``RunLock``); SIGTERM and SIGINT finish the step in
flight, save and exit with 128 + the signal's number (``StopSignals``, ``Interrupted``); a step's records are
written (and fsynced, ``MetricsLog.sync``) before its checkpoint is renamed into place; ``--resume`` refuses
settings outside ``RESUMABLE`` that changed (``changed_settings``).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from filelock import FileLock, Timeout

from . import checkpoint as ckpt
from .devices import Device
from .errors import BMojoError
from .evaluation import generate_text
from .plotting import plot_loss_curve
from .processes import Processes, all_sum
from .settings import TrainConfig

if TYPE_CHECKING:
    from .training import RunPlan

RUN_FILE = "train_config.yaml"
LOCK_FILE = ".lock"
# Training settings that --resume may change without --allow-changes: they do not alter what a step computes.
RESUMABLE = (
    *("out", "steps", "eval_every", "save_every", "threads", "tp", "zero1", "gradient_checkpointing"),
    *("selective_recompute", "keep_checkpoints", "sample_prompt", "sample_tokens"),
)


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line, ``{"step", "split": "train" | "val", ...}``."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                pass
        return records

    def truncate_after(self, step: int) -> None:
        """Forget what a crashed run logged after its last checkpoint (the resumed run logs it again)."""
        kept = "".join(json.dumps(r) + "\n" for r in self.read() if r["step"] <= step)
        ckpt.write_text_atomic(self.path, kept)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Flush the records to the disk (before the checkpoint they belong to is committed)."""
        if self.path.exists():
            ckpt.fsync(self.path)


def load_run_file(run_dir: Path) -> dict:
    """``train_config.yaml``: the training settings, plus ``preset`` and ``model`` (the model settings given)."""
    try:
        values = yaml.safe_load((run_dir / RUN_FILE).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BMojoError(f"cannot read the training settings of {run_dir}: {exc}") from None
    if not isinstance(values, dict):
        raise BMojoError(f"{run_dir / RUN_FILE} is not a mapping of training settings")
    return values


def load_train_settings(run_dir: Path) -> dict:
    """The training settings a run directory was started with."""
    return {k: v for k, v in load_run_file(run_dir).items() if k not in ("preset", "model")}


def write_run_file(out: Path, preset: str | None, model_settings: dict, cfg: TrainConfig) -> None:
    values = {"preset": preset, "model": model_settings, **dataclasses.asdict(cfg)}
    ckpt.write_text_atomic(out / RUN_FILE, yaml.safe_dump(values, sort_keys=False))


class RunLock:
    """``<out>/.lock``, held by the main process while it uses the run directory (the other processes of a
    ``torchrun`` job follow it). ``acquire`` creates ``out`` if needed; it is idempotent."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled, self.lock = out, enabled, None

    def check(self) -> bool:
        """Whether ``out`` is an existing directory; a ``BMojoError`` if it cannot be one."""
        try:
            exists, is_dir = self.out.exists(), self.out.is_dir()
        except OSError as exc:  # a name too long, ...
            raise BMojoError(f"cannot use --out {self.out}: {exc.strerror or exc}") from None
        if exists and not is_dir:
            raise BMojoError(f"--out {self.out} exists and is not a directory")
        return is_dir

    def acquire(self) -> None:
        if not self.enabled or self.lock is not None:
            return
        self.check()
        lock = FileLock(self.out / LOCK_FILE, timeout=0)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise BMojoError(f"{self.out} is in use by another run (lock {self.out / LOCK_FILE})") from None
        except OSError as exc:
            raise BMojoError(f"cannot use --out {self.out}: {exc.strerror or exc}") from None
        self.lock = lock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class Interrupted(BMojoError):
    """SIGTERM or SIGINT stopped training; the exit status is 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, SIGTERM and SIGINT only set ``signum``: the training loop saves and stops at the next step
    boundary. A second signal gets the previous handler (SIGINT: KeyboardInterrupt; SIGTERM: the process ends)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, procs: Processes, device: Device):
        self.procs, self.device, self.signum, self.previous = procs, device, None, {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        signal.signal(signum, self.previous[signum])
        signal.raise_signal(signum)

    def requested(self) -> int | None:
        """The signal to stop for, agreed among all processes (any process's signal stops them all)."""
        if self.procs.world_size == 1:
            return self.signum
        flags = torch.zeros(len(self.SIGNALS), device=self.device.torch_device)
        if self.signum is not None:
            flags[self.SIGNALS.index(self.signum)] = 1
        flags = all_sum(flags, self.procs).tolist()
        return next((s for s, f in zip(self.SIGNALS, flags, strict=True) if f > 0), None)


def newest_note(out: Path) -> str:
    found = ckpt.list_checkpoints(out)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"


def changed_settings(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """``name: saved -> requested`` for each setting outside ``RESUMABLE`` that differs."""
    return [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(requested, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUMABLE and getattr(saved, f.name) != getattr(requested, f.name)
    ]


def start_run_directory(out: Path, plan: RunPlan, metrics: MetricsLog) -> None:
    """A new run: forget the records of an earlier, checkpoint-less attempt; write the model and tokenizer."""
    for stale in (metrics.path, out / "loss_curve.png", out / "sample.txt"):
        stale.unlink(missing_ok=True)
    plan.model_config.to_json_file(str(out / "config.json"))
    plan.tokenizer.save(out / "tokenizer")


def finish_run(
    out: Path, model, tokenizer, cfg: TrainConfig, device: Device, metrics: MetricsLog, say, from_checkpoint=False
) -> None:
    """The end-of-run work once the last checkpoint exists: the loss curve and the sample."""
    plot_loss_curve(metrics.read(), out / "loss_curve.png")
    # Sampling is a host-driven loop of one-token steps: on XLA (and for a sharded model) it runs on a CPU copy of
    # the final checkpoint.
    last = ckpt.list_checkpoints(out)[-1]
    sampler = ckpt.load_model(last) if device.is_xla or from_checkpoint else model
    sample = generate_text(sampler, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
    ckpt.write_text_atomic(out / "sample.txt", sample + "\n")
    say(f"sample ({out / 'sample.txt'}):\n{sample}")
    say(f"done: {out} (checkpoint {last.name})")
