"""Training on the CPU (and, through ``torchrun``, on several processes of one machine).

A run directory ``<out>/`` holds ``config.json`` (the model), ``train_config.yaml`` (this module's
``TrainConfig``), ``tokenizer/``, ``checkpoints/step_XXXXXX/``, ``metrics.jsonl`` (one JSON record per training
step and per evaluation), ``loss_curve.png`` and ``sample.txt``.

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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .configuration_bmojo import PRESETS, BMojoConfig
from .data import STDLIB, Corpus, batch_positions, load_corpus
from .devices import DEVICES, Device
from .errors import BMojoError, TrainingDiverged
from .modeling_bmojo import BMojoForCausalLM
from .plotting import plot_loss_curve
from .tokenization import load_tokenizer

DEFAULT_PRESET = "cpu"
MODEL_KEYS = tuple(p for p in inspect.signature(BMojoConfig.__init__).parameters if p not in ("self", "kwargs"))


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=lambda: [STDLIB])  # see bmojo.data for what a source can be
    glob: str = "*"  # which files of a data folder to read
    text_key: str = "text"  # the field of a JSONL record that holds the text
    tokenizer: str = "byte"
    out: str = "runs/default"
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step, summed over processes and accumulation steps
    grad_accum: int = 1
    steps: int = 600
    lr: float = 7e-4  # best of 5e-4..6e-3 in a 300-step sweep of the default run
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    bf16: bool = False  # bfloat16 autocast
    seed: int = 0
    device: str = "cpu"  # or "xla": Trainium through torch-xla (bmojo.devices)
    threads: int = 0  # torch threads per process; 0 = the cores, shared among the processes
    val_fraction: float = 0.01
    eval_every: int = 100  # 0: evaluate only before and after training
    eval_batches: int = 8
    save_every: int = 100  # 0: save only at the end
    keep_checkpoints: int = 2
    sample_prompt: str = "def "
    sample_tokens: int = 300

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise BMojoError(f"unknown training setting {key!r}; known: {', '.join(sorted(known))}")
        cfg = cls(**{key: _coerce(f"train.{key}", value, getattr(defaults, key)) for key, value in values.items()})
        if not all(isinstance(source, str) for source in cfg.data):
            raise BMojoError(f"train.data must be a list of data sources (paths or 'stdlib'), got {cfg.data!r}")
        # Data paths are stored absolute, so the run's train_config.yaml (and --resume) work from any directory.
        cfg.data = [src if src == STDLIB else os.path.abspath(os.path.expanduser(src)) for src in cfg.data]
        return cfg

    def validate(self, model_config: BMojoConfig, world_size: int) -> None:
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise BMojoError(f"train.{name} must be {rule}, got {getattr(self, name)!r}")

        for f in dataclasses.fields(self):  # NaN passes no comparison below, and inf passes some
            value = getattr(self, f.name)
            if isinstance(value, float):
                check(math.isfinite(value), f.name, "a finite number")
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, "at least 1")
        for name in (
            "warmup_steps",
            "eval_every",
            "save_every",
            "threads",
            "sample_tokens",
            "weight_decay",
            "grad_clip",
        ):
            check(getattr(self, name) >= 0, name, ">= 0")
        check(self.lr > 0, "lr", "> 0")
        if self.warmup_steps > self.steps:
            raise BMojoError(
                f"train.warmup_steps ({self.warmup_steps}) must be at most train.steps ({self.steps}): "
                "lower --warmup-steps or raise --steps"
            )
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        check(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        check(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)")
        check(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}")
        check(bool(self.data), "data", "a non-empty list of data sources")
        check(
            self.seq_len >= model_config.chunk_size,
            "seq_len",
            f"at least model.chunk_size ({model_config.chunk_size}): a sequence must hold a whole chunk",
        )
        processes = world_size * self.grad_accum
        check(
            self.batch_size % processes == 0,
            "batch_size",
            f"a multiple of processes x grad_accum ({world_size} x {self.grad_accum})",
        )


def _coerce(name: str, value, default):
    """``value`` as the type of ``default`` (YAML reads ``1e-3`` as a string, and ints where floats are meant)."""
    if default is None or value is None:
        return value
    kind = type(default)
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    elif kind is list and isinstance(value, str):
        return [value]
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise BMojoError(f"{name} must be a {kind.__name__}, got {value!r}")


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Processes:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def default_threads(local_world_size: int) -> int:
    """The cores this process may use, shared among the processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size)


def _all_sum(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.world_size > 1:
        dist.all_reduce(values)
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
    model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50, seed: int = 0
) -> str:
    """``prompt`` and its continuation. The prompt follows an end-of-document token, as every document did in
    training. ``temperature == 0`` decodes greedily."""
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
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then a cosine decay to ``lr * min_lr_ratio`` at the last step (``step`` 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices and embeddings only; norms, biases and the SSM's A/D/dt are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def load_train_settings(run_dir: Path) -> dict:
    """The training settings a run directory was started with."""
    try:
        values = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BMojoError(f"cannot read the training settings of {run_dir}: {exc}") from None
    if not isinstance(values, dict):
        raise BMojoError(f"{run_dir / 'train_config.yaml'} is not a mapping of training settings")
    return values


def train(preset: str | None, model_overrides: dict, train_overrides: dict, resume: bool = False) -> dict:
    """Train as configured; returns the final validation metrics. ``resume`` continues the run in
    ``train.out`` from its newest checkpoint, with its saved settings under the given ones."""
    procs = Processes.from_env()
    try:
        return _train(procs, preset, model_overrides, train_overrides, resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _resolve(procs: Processes, preset, model_overrides: dict, train_overrides: dict, resume: bool):
    """(training config, tokenizer, model config, checkpoint to resume from or None), checked."""
    out = Path(train_overrides.get("out", TrainConfig.out))
    checkpoint = None
    if resume:
        found = ckpt.list_checkpoints(out)
        if not found:
            raise BMojoError(f"--resume: no checkpoint in {out / ckpt.CHECKPOINTS} to resume from")
        checkpoint = found[-1]
        saved_model, saved_train = ckpt.load_config(checkpoint), load_train_settings(out)
        cfg = TrainConfig.from_dict({**saved_train, **train_overrides, "out": str(out)})
        if cfg.tokenizer != saved_train.get("tokenizer"):
            raise BMojoError(
                f"{out} was trained with tokenizer {saved_train.get('tokenizer')!r}, not {cfg.tokenizer!r}"
            )
        tokenizer = load_tokenizer(out / "tokenizer")
        model_config = build_model_config(preset, model_overrides, tokenizer, saved=saved_model)
        check_same_model(model_config, saved_model, checkpoint)
    else:
        if ckpt.list_checkpoints(out):
            raise BMojoError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        cfg = TrainConfig.from_dict(train_overrides)
        tokenizer = load_tokenizer(cfg.tokenizer)
        model_config = build_model_config(preset, model_overrides, tokenizer)
    cfg.validate(model_config, procs.world_size)
    return cfg, tokenizer, model_config, checkpoint


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


def _train(procs: Processes, preset, model_overrides: dict, train_overrides: dict, resume: bool) -> dict:
    cfg, tokenizer, model_config, checkpoint = _resolve(procs, preset, model_overrides, train_overrides, resume)
    out = Path(cfg.out)
    say = tqdm.write if procs.is_main else (lambda *_: None)
    device = Device(cfg.device)
    if procs.world_size > 1:
        device.init_process_group(procs.world_size)
    torch.set_num_threads(cfg.threads or default_threads(procs.local_world_size))
    corpus = load_corpus(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.glob, cfg.text_key)

    torch.manual_seed(cfg.seed)
    model = ckpt.load_model(checkpoint) if checkpoint is not None else BMojoForCausalLM(model_config)
    device.place_model(model).train()
    optimizer = make_optimizer(model, cfg)
    metrics = MetricsLog(out / "metrics.jsonl")
    start = 0
    if checkpoint is not None:
        start = ckpt.load_training_state(checkpoint, optimizer)["step"]
        if procs.is_main:
            metrics.truncate_after(start)
        say(f"resuming {out} from {checkpoint.name}")
    elif procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics.path.unlink(missing_ok=True)
        model_config.to_json_file(str(out / "config.json"))
        tokenizer.save(out / "tokenizer")
    if procs.is_main:  # also when resuming: a later --resume continues with the settings in force now
        ckpt.write_text_atomic(out / "train_config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if start >= cfg.steps:
        say(f"{out} already finished {start} of {cfg.steps} steps; nothing to do")
        return {}

    # On the CPU, DDP averages the gradients during backward; on XLA, Device.reduce_gradients does after it.
    wrapped = DistributedDataParallel(model) if procs.world_size > 1 and not device.is_xla else model
    batches = StepBatches(corpus, cfg, procs, start)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    eval_windows = corpus.val_windows[: cfg.eval_batches * batches.micro_batch * procs.world_size]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    say(
        f"run {out}: {sum(p.numel() for p in model.parameters()):,} parameters on {device.torch_device} | "
        f"{len(corpus.tokens):,} tokens ({len(corpus.train_windows):,} train / {len(corpus.val_windows):,} val "
        f"sequences of {cfg.seq_len}) | {procs.world_size} process(es) x {torch.get_num_threads()} thread(s)"
    )
    finished: list[dict] = []  # the record of the step just run, once its values are on the host

    def check_and_record(step: int, lr: float, losses: torch.Tensor, grad_norm: torch.Tensor, has_innovation: bool):
        """Runs when the step's values can be read: on the CPU before the update (a diverged update is never
        applied); on XLA as a step closure, after the step's graph ran (reading earlier would split it)."""
        loss, lm_loss, innovation = losses.tolist()
        grad_norm = grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            found = ckpt.list_checkpoints(out)
            kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopped, {kept} "
                "(try a lower --lr)"
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
                "tokens": (step + 1) * tokens_per_step,
            }
        )

    def train_step(step: int, batch: torch.Tensor) -> None:
        """One optimizer update on ``batch``, this process's share of the global batch of ``step`` (0-based).
        Traced only on XLA: it runs at the ``device.barrier()`` that follows."""
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr  # a new Python float each step is a graph input on XLA, not a constant: no recompile
        losses = torch.zeros(3, device=device.torch_device)  # loss, lm_loss, innovation_loss
        for k, x in enumerate(batch):
            # Gradients are averaged across processes once per step, on the last micro-batch.
            last = k == cfg.grad_accum - 1
            with nullcontext() if last or wrapped is model else wrapped.no_sync():
                with autocast:
                    output = wrapped(input_ids=x, labels=x)
                (output.loss / cfg.grad_accum).backward()
            has_innovation = output.innovation_loss is not None
            innovation = output.innovation_loss if has_innovation else torch.zeros_like(output.loss)
            losses += torch.stack([output.loss, output.lm_loss, innovation]).detach().float()
        device.reduce_gradients(optimizer, procs.world_size)
        # The global batch's loss: all sequences have seq_len tokens, so it is the mean of the micro-batch means.
        losses = _all_sum(losses, procs) / (cfg.grad_accum * procs.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        device.after_step(check_and_record, step, lr, losses, grad_norm, has_innovation)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run_eval(step: int) -> dict:
        result = evaluate(model, corpus, eval_windows, batches.micro_batch, device, cfg.bf16, procs)
        if procs.is_main:
            metrics.append({"step": step, "split": "val", **result})
            plot_loss_curve(metrics.read(), out / "loss_curve.png")
        say(f"step {step}: validation LM loss {result['lm_loss']:.4f} (perplexity {result['perplexity']:.2f})")
        return result

    def save(step: int) -> None:
        if procs.is_main:
            ckpt.save_checkpoint(out, step, model, optimizer, {"tokens": step * tokens_per_step}, cfg.keep_checkpoints)
        if procs.world_size > 1 and not device.is_xla:
            dist.barrier()  # on XLA the next step's gradient all-reduce already waits for every process

    result = run_eval(0) if start == 0 else {}
    train_time = 0.0
    # In a log file (not a terminal) a progress line every 30 s is plenty.
    progress = dict(unit="step", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
    with tqdm(total=cfg.steps, initial=start, disable=not procs.is_main, **progress) as bar:
        started = time.perf_counter()
        for step, batch in zip(range(start, cfg.steps), device.loader(batches)):
            train_step(step, batch)
            done, final = step + 1, step + 1 == cfg.steps
            if final or (cfg.save_every and done % cfg.save_every == 0):
                device.after_step(save, done)  # on XLA: once the updated parameters hold values
            device.barrier()  # the step barrier: on XLA the step's graph runs here, then its closures
            train_time += time.perf_counter() - started
            record = finished.pop()
            record["tokens_per_s"] = tokens_per_step * (done - start) / train_time
            if procs.is_main:
                metrics.append(record)
            bar.update(1)
            bar.set_postfix(
                lm=f"{record['lm_loss']:.3f}",
                innov=f"{record['innovation_loss'] or 0:.3f}",
                tok_s=f"{record['tokens_per_s']:,.0f}",
            )
            if final or (cfg.eval_every and done % cfg.eval_every == 0):
                result = run_eval(done)
            started = time.perf_counter()

    if procs.is_main:
        # Sampling is a host-driven loop of one-token steps: on XLA it runs on a CPU copy of the final checkpoint.
        last = ckpt.list_checkpoints(out)[-1]
        sampler = ckpt.load_model(last) if device.is_xla else model
        sample = generate_text(sampler, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
        (out / "sample.txt").write_text(sample + "\n")
        say(f"sample ({out / 'sample.txt'}):\n{sample}")
        say(f"done: {out} (checkpoint {last.name})")
    return result
