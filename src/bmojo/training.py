"""Training on the CPU (and, through ``torchrun``, on several processes of one machine).

A run directory ``<out>/`` holds ``config.json`` (the model), ``train_config.yaml`` (this module's
``TrainConfig``), ``tokenizer/``, ``checkpoints/step_XXXXXX/``, ``metrics.jsonl`` (one JSON record per training
step and per evaluation), ``loss_curve.png``, ``sample.txt`` and ``.lock``.

Safety of the run directory:

* One run at a time: the main process holds ``<out>/.lock`` (``filelock``) while it trains; a second run on the
  same directory stops with one error line before it writes anything.
* SIGTERM and SIGINT finish the step in flight, save a checkpoint and exit with status 128 + the signal's number
  (143, 130); a second signal stops at once.
* A step's records (metrics, evaluation, plot) are written before its checkpoint is renamed into place, and a
  resumed run drops the records newer than its checkpoint. If the last step's checkpoint exists but the sample
  does not, ``--resume`` writes it.
* ``--resume`` continues with the run's saved settings; any other than ``RESUMABLE`` that differs is refused
  (``allow_changes`` accepts them). Resuming to another ``steps`` keeps the run's cosine schedule
  (``decay_steps``): past its end the learning rate stays at the floor, so it never jumps at the resume point.
  The token counter continues from the checkpoint's.
* ``train_config.yaml`` records the preset and the model settings given beside the training settings, so
  ``--config <run>/train_config.yaml`` builds the same run (``run_file_sections``).
* Checkpoints carry SHA-256 checksums; ``--resume`` falls back past damaged ones (with a warning, and renames
  them ``step_XXXXXX.damaged``).

Exact resume: the sequences of step ``s`` are a pure function of ``(seed, s)`` (``data.batch_positions``) and a
checkpoint holds the model, the AdamW state and the RNG state, so continuing from step ``s`` computes bit for bit
what the uninterrupted run computed (with the same number of threads and processes).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from filelock import FileLock, Timeout
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .configuration_bmojo import PRESETS, BMojoConfig
from .data import Corpus, batch_positions, load_corpus
from .devices import Device
from .errors import BMojoError, TrainingDiverged
from .modeling_bmojo import BMojoForCausalLM
from .parallel import training as ptrain
from .parallel.tensor_parallel import clip_grad_norm_ as parallel_clip_grad_norm_
from .parallel.tensor_parallel import parallel_context
from .parallel.training import is_parallel_checkpoint
from .plotting import plot_loss_curve
from .settings import DEFAULT_PRESET, TrainConfig, _coerce, run_file_sections  # noqa: F401 (re-exported)
from .tokenization import load_tokenizer

MODEL_KEYS = tuple(p for p in inspect.signature(BMojoConfig.__init__).parameters if p not in ("self", "kwargs"))
RUN_FILE = "train_config.yaml"
LOCK_FILE = ".lock"
# Training settings that --resume may change without --allow-changes: they do not alter what a step computes.
RESUMABLE = (
    *("out", "steps", "eval_every", "save_every", "threads", "tp", "zero1"),
    *("keep_checkpoints", "sample_prompt", "sample_tokens"),
)


# ---------------------------------------------------------------------------------------------------------------
# The model configuration
# ---------------------------------------------------------------------------------------------------------------
def model_fields(config: BMojoConfig) -> dict:
    return {key: getattr(config, key) for key in MODEL_KEYS}


def build_model_config(preset: str | None, overrides: dict, tokenizer, saved: BMojoConfig | None = None) -> BMojoConfig:
    """The preset (default "cpu"; when resuming without one, the checkpoint's configuration), then ``overrides``.
    The vocabulary and the special-token ids follow the tokenizer (the size rounded up to a multiple of 8)
    unless ``overrides`` set them."""
    for key in overrides:
        if key not in MODEL_KEYS:
            raise BMojoError(f"unknown model setting {key!r}; known: {', '.join(MODEL_KEYS)}")
    if preset is not None and preset not in PRESETS:
        raise BMojoError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if saved is not None and preset is None:
        fields = model_fields(saved)
    else:
        fields = {k: v for k, v in PRESETS[preset or DEFAULT_PRESET].items() if k != "vocab_size"}
        fields.update(
            vocab_size=-(-tokenizer.vocab_size // 8) * 8,
            pad_token_id=tokenizer.pad_id,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
        )
    defaults = inspect.signature(BMojoConfig.__init__).parameters
    fields.update({key: _coerce(f"model.{key}", value, defaults[key].default) for key, value in overrides.items()})
    try:
        config = BMojoConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise BMojoError(f"invalid model configuration: {exc}") from None
    if config.vocab_size < tokenizer.vocab_size:
        raise BMojoError(
            f"model.vocab_size ({config.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size})"
        )
    return config


def check_same_model(config: BMojoConfig, saved: BMojoConfig, where: Path) -> None:
    now, before = model_fields(config), model_fields(saved)
    diffs = [f"{k}: {before[k]!r} in the checkpoint, {now[k]!r} now" for k in MODEL_KEYS if now[k] != before[k]]
    if diffs:
        raise BMojoError(f"{where} was trained with a different model configuration ({'; '.join(diffs)})")


# ---------------------------------------------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Processes:
    """This process's place among those ``torchrun`` started (one process without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    group: object = None  # the torch.distributed group these processes form (None: all of them)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Processes:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def default_threads(local_world_size: int) -> int:
    """The cores this process may use, shared among the processes on this machine.

    All cores is right only with ``OMP_WAIT_POLICY=PASSIVE``, which the ``bmojo`` command sets before torch loads
    (``bmojo.cli.set_thread_environment``): with spinning OpenMP threads, one other busy process makes every
    parallel region wait for the thread that shares its core. Seconds per step of the default run on 2 cores
    (``scripts/bench_threads.py``, median of 3, machine shared; README "CPU threads"):

    ====================  =====  ===============  ==================  ===============
    threads               alone  one busy core    alone, load 8-12    one busy core
    ====================  =====  ===============  ==================  ===============
    2, spinning           6.18   21.6             36.7                51.5
    1                     1.46   4.13             3.94                7.18
    2, passive (default)  1.39   3.53             4.13                2.90
    ====================  =====  ===============  ==================  ===============
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size)


def _all_sum(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.world_size > 1:
        dist.all_reduce(values, group=procs.group)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and sampling
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model,
    corpus: Corpus,
    windows,
    batch_size: int,
    device: Device | torch.device,
    bf16: bool = False,
    procs: Processes | None = None,
) -> dict:
    """Mean LM loss (and innovation loss) over ``windows``, split among the processes. The sums stay on the
    device (one graph per batch on XLA) and are read once, at the end."""
    procs = procs or Processes()
    device = device if isinstance(device, Device) else Device(device.type)
    was_training = model.training
    model.eval()
    # float64 where the device has it (XLA: Trainium has no float64)
    sums = torch.zeros(2, dtype=torch.float32 if device.is_xla else torch.float64, device=device.torch_device)
    rows, has_innovation = 0, False
    mine = windows[procs.rank :: procs.world_size]
    for i in range(0, len(mine), batch_size):
        x = corpus.batch(mine[i : i + batch_size]).to(device.torch_device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=x, labels=x)
        has_innovation = out.innovation_loss is not None
        innovation = out.innovation_loss if has_innovation else torch.zeros_like(out.lm_loss)
        sums += torch.stack([out.lm_loss, innovation]).to(sums.dtype) * len(x)
        rows += len(x)
        device.barrier()
    model.train(was_training)
    lm_sum, innovation_sum, rows = _all_sum(torch.cat([sums, sums.new_tensor([rows])]), procs).tolist()
    return {
        "lm_loss": lm_sum / rows,
        "innovation_loss": innovation_sum / rows if has_innovation else None,
        "perplexity": math.exp(min(lm_sum / rows, 700.0)),  # capped: a diverged model must not crash the report
        "tokens": int(rows) * corpus.seq_len,
    }


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    streamer=None,
) -> str:
    """``prompt`` and its continuation. The prompt follows an end-of-document token, as every document did in
    training. ``temperature == 0`` decodes greedily. ``streamer`` (e.g. ``TextStream``) receives the tokens as
    they come."""
    from transformers import GenerationConfig

    ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.encode(prompt)
    if not ids:
        raise BMojoError("the prompt is empty and the tokenizer has no end-of-document token to start from")
    torch.manual_seed(seed)
    model.eval()
    x = torch.tensor([ids], device=model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
        **sampling,
    )
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config, streamer=streamer)
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())


class TextStream:
    """A ``generate(streamer=...)`` streamer (transformers' ``BaseStreamer`` interface: ``put``, ``end``) that
    writes the continuation to ``out`` (default: ``sys.stdout``) token by token and flushes; what it writes adds
    up to ``tokenizer.decode`` of all generated ids. A trailing U+FFFD, which may be an unfinished UTF-8
    character, waits for the next token."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] | None = None  # None until generate has passed the prompt
        self.written = 0

    def put(self, value: torch.Tensor) -> None:
        if self.ids is None:  # the first call carries the prompt
            self.ids = []
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        self._write(text[:-1] if text.endswith("\ufffd") else text)

    def end(self) -> None:
        self._write(self.tokenizer.decode(self.ids or []))

    def _write(self, text: str) -> None:
        if len(text) > self.written:
            out = self.out or sys.stdout
            out.write(text[self.written :])
            out.flush()
            self.written = len(text)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then a cosine decay to ``lr * min_lr_ratio`` at step ``decay_steps`` (default: the
    last step), and the floor after it (``step`` 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    horizon = cfg.decay_steps or cfg.steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: TrainConfig, ctx=None) -> torch.optim.Optimizer:
    """AdamW; with ``cfg.zero1`` its state sharded over ``ctx``'s data-parallel group (ZeRO-1)."""
    # Weight decay on matrices and embeddings only; norms, biases and the SSM's A/D/dt are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return ptrain.build_optimizer(groups, ctx, cfg.zero1, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# ---------------------------------------------------------------------------------------------------------------
# The run directory: its settings file, its lock, the signals that stop it
# ---------------------------------------------------------------------------------------------------------------
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
        flags = _all_sum(flags, self.procs).tolist()
        return next((s for s, f in zip(self.SIGNALS, flags, strict=True) if f > 0), None)


def _newest_note(out: Path) -> str:
    found = ckpt.list_checkpoints(out)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"


# ---------------------------------------------------------------------------------------------------------------
# Resolving the settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    """What a run trains: the checked settings, and on --resume the checkpoint (and the damaged newer ones)."""

    cfg: TrainConfig
    tokenizer: object
    model_config: BMojoConfig
    preset: str | None  # recorded in train_config.yaml with the model settings given
    model_settings: dict
    checkpoint: Path | None = None
    damaged: list[Path] = field(default_factory=list)


def changed_settings(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """``name: saved -> requested`` for each setting outside ``RESUMABLE`` that differs."""
    return [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(requested, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUMABLE and getattr(saved, f.name) != getattr(requested, f.name)
    ]


def _resolve(procs: Processes, preset, model_overrides: dict, train_overrides: dict, resume: bool, allow_changes: bool):
    out = Path(train_overrides.get("out", TrainConfig.out))
    if resume:
        plan = _resolve_resume(out, preset, model_overrides, train_overrides, allow_changes, procs.is_main)
    else:
        if ckpt.list_checkpoints(out):
            raise BMojoError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        cfg = TrainConfig.from_dict(train_overrides)
        tokenizer = load_tokenizer(cfg.tokenizer)
        model_config = build_model_config(preset, model_overrides, tokenizer)
        plan = RunPlan(cfg, tokenizer, model_config, preset or DEFAULT_PRESET, dict(model_overrides))
    plan.cfg.validate(plan.model_config, procs.world_size)
    return plan


def _resolve_resume(out: Path, preset, model_overrides: dict, train_overrides: dict, allow_changes: bool, main: bool):
    if not ckpt.list_checkpoints(out):
        raise BMojoError(f"--resume: no checkpoint in {out / ckpt.CHECKPOINTS} to resume from")
    warn = (lambda line: print(f"bmojo: warning: {line}", file=sys.stderr)) if main else (lambda line: None)
    checkpoint, damaged = ckpt.newest_verified(out, warn)
    run_file = load_run_file(out)
    saved_settings = load_train_settings(out)
    saved = TrainConfig.from_dict(saved_settings)
    cfg = TrainConfig.from_dict({**saved_settings, **train_overrides, "out": str(out)})
    if cfg.tokenizer != saved.tokenizer:
        raise BMojoError(f"{out} was trained with tokenizer {saved.tokenizer!r}, not {cfg.tokenizer!r}")
    changes = changed_settings(saved, cfg)
    if changes and not allow_changes:
        raise BMojoError(
            f"--resume: {out} was started with other settings ({'; '.join(changes)}); "
            "pass --allow-changes to continue with the new ones"
        )
    if cfg.steps != saved.steps and not cfg.decay_steps:
        cfg.decay_steps = saved.steps  # keep the run's cosine schedule: no jump in the learning rate
    saved_model = ckpt.load_config(checkpoint)
    tokenizer = load_tokenizer(out / "tokenizer")
    model_config = build_model_config(preset, model_overrides, tokenizer, saved=saved_model)
    check_same_model(model_config, saved_model, checkpoint)
    model_settings = {**(run_file.get("model") or {}), **model_overrides}
    return RunPlan(cfg, tokenizer, model_config, run_file.get("preset", preset), model_settings, checkpoint, damaged)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def train(
    preset: str | None, model_overrides: dict, train_overrides: dict, resume: bool = False, allow_changes: bool = False
) -> dict:
    """Train as configured; returns the final validation metrics. ``resume`` continues the run in ``train.out``
    from its newest intact checkpoint, with its saved settings under the given ones (settings outside
    ``RESUMABLE`` may differ only with ``allow_changes``)."""
    procs = Processes.from_env()
    out = Path(train_overrides.get("out", TrainConfig.out))
    try:
        with RunLock(out, procs.is_main) as lock:
            if lock.check():
                lock.acquire()  # before reading the run's state; a new directory is created only once all is checked
            plan = _resolve(procs, preset, model_overrides, train_overrides, resume, allow_changes)
            cfg = plan.cfg  # the data is read (and checked) before a new run directory is created
            corpus = load_corpus(cfg.data, plan.tokenizer, cfg.seq_len, cfg.val_fraction, cfg.glob, cfg.text_key)
            lock.acquire()
            return _train(procs, plan, corpus)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, the final sample) or a second Ctrl-C
        raise Interrupted(f"stopped by SIGINT; {_newest_note(out)}", signal.SIGINT) from None
    except OSError as exc:  # the disk is full, a file became unwritable, ...
        if exc.errno is None:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise BMojoError(f"cannot write into {out}: {exc.strerror}{where}") from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class StepBatches:
    """The token ids of training steps ``start .. steps-1`` for this process, one ``[grad_accum, micro_batch,
    seq_len]`` tensor a step. The sequences of a step are a pure function of ``(seed, step)``, so a resumed run
    sees exactly what the uninterrupted run saw."""

    def __init__(self, corpus: Corpus, cfg: TrainConfig, procs: Processes, start: int):
        self.corpus, self.cfg, self.procs, self.start = corpus, cfg, procs, start
        self.micro_batch = cfg.batch_size // (procs.world_size * cfg.grad_accum)

    def __len__(self) -> int:
        return self.cfg.steps - self.start

    def __iter__(self):
        cfg, procs = self.cfg, self.procs
        for step in range(self.start, cfg.steps):
            positions = batch_positions(cfg.seed, step, cfg.batch_size, len(self.corpus.train_windows))
            positions = positions.reshape(cfg.grad_accum, procs.world_size, self.micro_batch)[:, procs.rank]
            yield torch.stack([self.corpus.batch(self.corpus.train_windows[micro]) for micro in positions])


def _start_run_directory(out: Path, plan: RunPlan, metrics: MetricsLog) -> None:
    """A new run: forget the records of an earlier, checkpoint-less attempt; write the model and tokenizer."""
    for stale in (metrics.path, out / "loss_curve.png", out / "sample.txt"):
        stale.unlink(missing_ok=True)
    plan.model_config.to_json_file(str(out / "config.json"))
    plan.tokenizer.save(out / "tokenizer")


def _finish_run(
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


def _due(every: int, done: int) -> bool:
    return bool(every) and done % every == 0


def _train(procs: Processes, plan: RunPlan, corpus: Corpus) -> dict:
    cfg, tokenizer, checkpoint = plan.cfg, plan.tokenizer, plan.checkpoint
    out = Path(cfg.out)
    say = tqdm.write if procs.is_main else (lambda *_: None)
    device = Device(cfg.device)
    if procs.world_size > 1:
        device.init_process_group(procs.world_size)
    torch.set_num_threads(cfg.threads or default_threads(procs.local_world_size))

    # tp x dp (bmojo.parallel.training): data, losses and evaluation over the data-parallel processes
    ctx = parallel_context(cfg.tp)
    data_procs = Processes(ctx.dp_rank, ctx.dp_size, procs.local_world_size, ctx.dp_group)
    resuming_parallel = checkpoint is not None and is_parallel_checkpoint(checkpoint)
    parallel = cfg.tp > 1 or cfg.zero1 or cfg.dtype != "float32" or resuming_parallel
    if parallel:
        model = ptrain.build_model(plan.model_config, ctx, cfg.seed, cfg.dtype, checkpoint)
    else:
        torch.manual_seed(cfg.seed)
        model = ckpt.load_model(checkpoint) if checkpoint is not None else BMojoForCausalLM(plan.model_config)
    device.place_model(model).train()
    optimizer = make_optimizer(model, cfg, ctx)
    metrics = MetricsLog(out / "metrics.jsonl")
    start, start_tokens = 0, 0
    if checkpoint is not None:
        if parallel:  # any checkpoint, at any TP degree: shards merged and split by the plan
            state = ptrain.load_training_state(checkpoint, model, optimizer, ctx)
        else:
            state = ckpt.load_training_state(checkpoint, optimizer)
        start, start_tokens = state["step"], state["tokens"]
        if procs.is_main:
            for damaged in plan.damaged:
                ckpt.set_aside(damaged)
            metrics.truncate_after(start)
        say(f"resuming {out} from {checkpoint.name}")
    elif procs.is_main:
        _start_run_directory(out, plan, metrics)
    if procs.is_main:  # also when resuming: a later --resume continues with the settings in force now
        write_run_file(out, plan.preset, plan.model_settings, cfg)
    if start >= cfg.steps:
        if procs.is_main and not (out / "sample.txt").is_file():  # stopped between the last checkpoint and the end
            _finish_run(out, model, tokenizer, cfg, device, metrics, say)
        else:
            say(f"{out} already finished {start} of {cfg.steps} steps; nothing to do")
        return {}

    # On the CPU, DDP averages the gradients during backward; on XLA, Device.reduce_gradients does after it.
    # With --tp, over the data-parallel group only: replicated parameters get the same gradient on every
    # tensor-parallel rank already (bmojo.parallel.training).
    ddp = data_procs.world_size > 1 and not device.is_xla
    wrapped = DistributedDataParallel(model, process_group=ctx.dp_group) if ddp else model
    batches = StepBatches(corpus, cfg, data_procs, start)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    eval_windows = corpus.val_windows[: cfg.eval_batches * batches.micro_batch * data_procs.world_size]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    say(
        f"run {out}: {sum(p.numel() for p in model.parameters()):,} parameters on {device.torch_device} | "
        f"{len(corpus.tokens):,} tokens ({len(corpus.train_windows):,} train / {len(corpus.val_windows):,} val "
        f"sequences of {cfg.seq_len}) | {procs.world_size} process(es) x {torch.get_num_threads()} thread(s)"
        + (f" | tp {cfg.tp} x dp {ctx.dp_size}{' | ZeRO-1' if cfg.zero1 else ''}" if parallel else "")
    )
    finished: list[dict] = []  # the record of the step just run, once its values are on the host

    def tokens_after(done: int) -> int:  # continues from the checkpoint's count, whatever the batch is now
        return start_tokens + (done - start) * tokens_per_step

    def check_and_record(step: int, lr: float, losses: torch.Tensor, grad_norm: torch.Tensor, has_innovation: bool):
        """Runs when the step's values can be read: on the CPU before the update (a diverged update is never
        applied); on XLA as a step closure, after the step's graph ran (reading earlier would split it)."""
        loss, lm_loss, innovation = losses.tolist()
        grad_norm = grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopped, "
                f"{_newest_note(out)} (try a lower --lr)"
            )
        finished.append(
            {
                "step": step + 1,
                "split": "train",
                "loss": loss,
                "lm_loss": lm_loss,
                "innovation_loss": innovation if has_innovation else None,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens_after(step + 1),
            }
        )

    def train_step(step: int, batch: torch.Tensor) -> None:
        """One optimizer update on ``batch``, this process's share of the global batch of ``step`` (0-based).
        Traced only on XLA: it runs at the ``device.barrier()`` that follows."""
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr  # a new Python float each step is a graph input on XLA, not a constant: no recompile
        losses = torch.zeros(3, dtype=ptrain.DTYPES[cfg.dtype], device=device.torch_device)  # loss, lm, innovation
        for k, x in enumerate(batch):
            # Gradients are averaged across processes once per step, on the last micro-batch.
            last = k == cfg.grad_accum - 1
            with nullcontext() if last or wrapped is model else wrapped.no_sync():
                with autocast:
                    output = wrapped(input_ids=x, labels=x)
                (output.loss / cfg.grad_accum).backward()
            has_innovation = output.innovation_loss is not None
            innovation = output.innovation_loss if has_innovation else torch.zeros_like(output.loss)
            losses += torch.stack([output.loss, output.lm_loss, innovation]).detach().to(losses.dtype)
        device.reduce_gradients(optimizer, procs.world_size)
        # The global batch's loss: all sequences have seq_len tokens, so it is the mean of the micro-batch means.
        losses = _all_sum(losses, data_procs) / (cfg.grad_accum * data_procs.world_size)
        if cfg.tp > 1:  # the full model's gradient norm: sharded squares summed over the group, replicated once
            grad_norm = parallel_clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf, ctx)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        device.after_step(check_and_record, step, lr, losses, grad_norm, has_innovation)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run_eval(step: int) -> dict:
        result = evaluate(model, corpus, eval_windows, batches.micro_batch, device, cfg.bf16, data_procs)
        if procs.is_main:
            metrics.append({"step": step, "split": "val", **result})
            plot_loss_curve(metrics.read(), out / "loss_curve.png")
        say(f"step {step}: validation LM loss {result['lm_loss']:.4f} (perplexity {result['perplexity']:.2f})")
        return result

    def save(step: int) -> Path:
        """After the step's records: a checkpoint that exists always has them (on XLA the step has run by now)."""
        if parallel:  # every process writes its part; the last checkpoint also gets the merged model
            if procs.is_main:
                metrics.sync()
            state = {"tokens": tokens_after(step)}
            return ptrain.save(out, step, model, optimizer, ctx, state, cfg.keep_checkpoints, step == cfg.steps)
        if procs.is_main:
            metrics.sync()
            state = {"tokens": tokens_after(step)}
            ckpt.save_checkpoint(out, step, model, optimizer, state, cfg.keep_checkpoints)
        if procs.world_size > 1 and not device.is_xla:
            dist.barrier()  # on XLA the next step's gradient all-reduce already waits for every process
        return ckpt.checkpoint_path(out, step)

    result = run_eval(0) if start == 0 else {}
    train_time = 0.0
    # In a log file (not a terminal) a progress line every 30 s is plenty; set_postfix must not refresh it.
    progress = dict(unit="step", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
    bar = tqdm(total=cfg.steps, initial=start, disable=not procs.is_main, **progress)
    with bar, StopSignals(procs, device) as stop:
        started = time.perf_counter()
        for step, batch in zip(range(start, cfg.steps), device.loader(batches)):
            train_step(step, batch)
            device.barrier()  # the step barrier: on XLA the step's graph runs here, then its closures
            train_time += time.perf_counter() - started
            done, final = step + 1, step + 1 == cfg.steps
            record = finished.pop()
            record["tokens_per_s"] = tokens_per_step * (done - start) / train_time
            if procs.is_main:
                metrics.append(record)
            bar.update(1)
            bar.set_postfix(
                lm=f"{record['lm_loss']:.3f}",
                innov=f"{record['innovation_loss'] or 0:.3f}",
                tok_s=f"{record['tokens_per_s']:,.0f}",
                refresh=False,
            )
            if final or _due(cfg.eval_every, done):
                result = run_eval(done)
            signum = stop.requested()
            if final or _due(cfg.save_every, done) or signum is not None:
                saved = save(done)
            if signum is not None and not final:
                name = signal.Signals(signum).name
                raise Interrupted(f"stopped by {name} after step {done}: saved {saved}; continue with --resume", signum)
            started = time.perf_counter()

    if procs.is_main:
        _finish_run(out, model, tokenizer, cfg, device, metrics, say, from_checkpoint=cfg.tp > 1)
    return result
