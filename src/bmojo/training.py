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

import inspect
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .configuration_bmojo import PRESETS, BMojoConfig
from .data import Corpus, batch_positions, load_corpus
from .devices import Device
from .errors import BMojoError, TrainingDiverged
from .evaluation import evaluate
from .modeling_bmojo import BMojoForCausalLM
from .parallel import training as ptrain
from .parallel.tensor_parallel import clip_grad_norm_ as parallel_clip_grad_norm_
from .parallel.tensor_parallel import parallel_context
from .parallel.training import is_parallel_checkpoint
from .plotting import plot_loss_curve
from .priming import distill_loss, load_teacher, set_key_set_biases, set_trainable
from .processes import Processes, all_sum, default_threads
from .run_directory import (
    Interrupted,
    MetricsLog,
    RunLock,
    StopSignals,
    changed_settings,
    finish_run,
    load_run_file,
    load_train_settings,
    newest_note,
    start_run_directory,
    write_run_file,
)
from .settings import DEFAULT_PRESET, TrainConfig, _coerce
from .tokenization import load_tokenizer

MODEL_KEYS = tuple(p for p in inspect.signature(BMojoConfig.__init__).parameters if p not in ("self", "kwargs"))


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


def make_optimizer(model, cfg: TrainConfig, ctx=None, nxd=None) -> torch.optim.Optimizer:
    """AdamW; with ``cfg.zero1`` its state sharded over ``ctx``'s data-parallel group (ZeRO-1); through
    neuronx-distributed when ``nxd`` (a ``bmojo.parallel.neuron.NeuronTraining``) is given."""
    # Weight decay on matrices and embeddings only; norms, biases and the SSM's A/D/dt are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if nxd is not None:
        return nxd.build_optimizer(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return ptrain.build_optimizer(groups, ctx, cfg.zero1, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def load_init(model: BMojoForCausalLM, directory: Path) -> None:
    """``--init``: the weights of ``directory`` (a checkpoint of any TP degree, or ``bmojo convert``'s output)
    into ``model``, whose configuration may differ only where no parameter's shape depends on it."""
    from .parallel.convert import load_full_state_dict

    ckpt.verify_checkpoint(directory)
    _, state = load_full_state_dict(directory)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise BMojoError(f"the weights in {directory} do not fit the model: {str(exc).splitlines()[-1].strip()}")
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise BMojoError(f"the weights in {directory} do not fit the model: missing {missing}, unexpected {unexpected}")


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
    init: Path | None = None  # --init: the checkpoint whose weights a new run starts from


def _resolve(procs: Processes, preset, model_overrides: dict, train_overrides: dict, resume: bool, allow_changes: bool):
    out = Path(train_overrides.get("out", TrainConfig.out))
    if resume:
        plan = _resolve_resume(out, preset, model_overrides, train_overrides, allow_changes, procs.is_main)
    else:
        if ckpt.list_checkpoints(out):
            raise BMojoError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        cfg = TrainConfig.from_dict(train_overrides)
        if cfg.init:
            plan = _resolve_init(cfg, preset, model_overrides, "tokenizer" in train_overrides)
        else:
            tokenizer = load_tokenizer(cfg.tokenizer)
            model_config = build_model_config(preset, model_overrides, tokenizer)
            plan = RunPlan(cfg, tokenizer, model_config, preset or DEFAULT_PRESET, dict(model_overrides))
    plan.cfg.validate(plan.model_config, procs.world_size)
    return plan


def _resolve_init(cfg: TrainConfig, preset, model_overrides: dict, tokenizer_given: bool) -> RunPlan:
    """A new run from ``--init``'s weights: its configuration (under ``model_overrides``) and, unless
    ``--tokenizer`` is given, its tokenizer (the directory's own files, or its run's ``tokenizer/``)."""
    if preset is not None:
        raise BMojoError(f"--preset {preset} and --init both choose the model: give one of them")
    checkpoint = ckpt.resolve_checkpoint(cfg.init)
    if not tokenizer_given:
        places = (Path(cfg.init), checkpoint, ckpt.run_dir_of(checkpoint) / "tokenizer")
        found = [d for d in places if _has_tokenizer(d)]
        if not found:
            raise BMojoError(f"--init {cfg.init}: no tokenizer there; pass --tokenizer")
        cfg.tokenizer = str(found[0])
    tokenizer = load_tokenizer(cfg.tokenizer)
    model_config = build_model_config(None, model_overrides, tokenizer, saved=ckpt.load_config(checkpoint))
    return RunPlan(cfg, tokenizer, model_config, None, dict(model_overrides), init=checkpoint)


def _has_tokenizer(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "byte_tokenizer.json")
    return directory.is_dir() and any((directory / name).is_file() for name in names)


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
        raise Interrupted(f"stopped by SIGINT; {newest_note(out)}", signal.SIGINT) from None
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


def _due(every: int, done: int) -> bool:
    return bool(every) and done % every == 0


def _train(procs: Processes, plan: RunPlan, corpus: Corpus) -> dict:
    return Trainer(procs, plan, corpus).run()


class Trainer:
    """One training run, set up by ``__init__`` (device, model, optimizer, the checkpoint's state) and driven by
    ``run``: the loop reads top to bottom there; the step, the evaluation and the save are methods below it.

    With ``--tp`` (``bmojo.parallel.training``) the model is this rank's shard, and data, losses and evaluation
    go over the data-parallel processes (``data_procs``). On ``--device xla`` with ``--tp``/``--zero1`` the groups,
    the model's placement and the optimizer come from neuronx-distributed (``self.nxd``,
    ``bmojo.parallel.neuron.NeuronTraining``), whose optimizer step also averages the gradients over the
    data-parallel group and clips them; everything else is the same loop."""

    def __init__(self, procs: Processes, plan: RunPlan, corpus: Corpus):
        cfg = plan.cfg
        self.procs, self.plan, self.corpus, self.cfg, self.out = procs, plan, corpus, cfg, Path(cfg.out)
        self.say = tqdm.write if procs.is_main else (lambda *_: None)
        self.device = device = Device(cfg.device)
        if procs.world_size > 1:
            device.init_process_group(procs.world_size)
        torch.set_num_threads(cfg.threads or default_threads(procs.local_world_size))
        self.nxd = None
        if device.is_xla and (cfg.tp > 1 or cfg.zero1):
            from .parallel.neuron import NeuronTraining

            self.nxd = NeuronTraining(cfg.tp, cfg.zero1, cfg.grad_clip or math.inf)
        self.ctx = ctx = self.nxd.ctx if self.nxd is not None else parallel_context(cfg.tp)
        self.data_procs = Processes(ctx.dp_rank, ctx.dp_size, procs.local_world_size, ctx.dp_group)
        checkpoint = plan.checkpoint
        resuming_parallel = checkpoint is not None and is_parallel_checkpoint(checkpoint)
        self.parallel = cfg.tp > 1 or cfg.zero1 or cfg.dtype != "float32" or resuming_parallel
        if self.nxd is not None:  # resuming: the checkpoint's weights; a new --init run: the --init directory's
            self.model = self.nxd.build_model(plan.model_config, cfg.seed, cfg.dtype, checkpoint or plan.init)
        elif self.parallel:
            self.model = ptrain.build_model(plan.model_config, ctx, cfg.seed, cfg.dtype, checkpoint or plan.init)
        elif checkpoint is not None:
            self.model = ckpt.load_model(checkpoint)
        else:
            torch.manual_seed(cfg.seed)
            self.model = BMojoForCausalLM(plan.model_config)
            if plan.init is not None:
                load_init(self.model, plan.init)
        if checkpoint is None and cfg.key_set_bias_start is not None:  # a new run (a resumed one has its own)
            set_key_set_biases(self.model, cfg.key_set_bias_start)
        self.trainable = set_trainable(self.model, cfg.trainable)  # before the optimizer: it takes these only
        if cfg.gradient_checkpointing:  # transformers 5.x names it activation_checkpointing_enable (4.57: gradient_)
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)()
        if cfg.selective_recompute:
            self.model.selective_recompute_enable()
        device.place_model(self.model).train()
        self.teacher = None
        if cfg.teacher:  # frozen, in the student's parameter dtype
            dtype = next(self.model.parameters()).dtype
            self.teacher = device.place_model(load_teacher(cfg.teacher, plan.model_config.vocab_size, dtype))
        self.optimizer = make_optimizer(self.model, cfg, ctx, self.nxd)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.start, self.start_tokens = self._restore_or_start()
        # On the CPU, DDP averages the gradients during backward; on XLA, Device.reduce_gradients does after it.
        # With --tp, over the data-parallel group only: replicated parameters get the same gradient on every
        # tensor-parallel rank already (bmojo.parallel.training).
        ddp = self.data_procs.world_size > 1 and not device.is_xla
        self.wrapped = DistributedDataParallel(self.model, process_group=ctx.dp_group) if ddp else self.model
        self.batches = StepBatches(corpus, cfg, self.data_procs, self.start)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        eval_rows = cfg.eval_batches * self.batches.micro_batch * self.data_procs.world_size
        self.eval_windows = corpus.val_windows[:eval_rows]
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        self.finished: list[dict] = []  # the record of the step just run, once its values are on the host

    def _restore_or_start(self) -> tuple[int, int]:
        """(first step, tokens seen before it): the checkpoint's state on --resume, else a fresh run directory."""
        plan, procs, out = self.plan, self.procs, self.out
        start = tokens = 0
        if plan.checkpoint is not None:
            if self.parallel:  # any checkpoint, at any TP degree: shards merged and split by the plan
                state = ptrain.load_training_state(plan.checkpoint, self.model, self.optimizer, self.ctx)
            else:
                state = ckpt.load_training_state(plan.checkpoint, self.optimizer)
            start, tokens = state["step"], state["tokens"]
            if procs.is_main:
                for damaged in plan.damaged:
                    ckpt.set_aside(damaged)
                self.metrics.truncate_after(start)
            self.say(f"resuming {out} from {plan.checkpoint.name}")
        elif procs.is_main:
            start_run_directory(out, plan, self.metrics)
        if procs.is_main:  # also when resuming: a later --resume continues with the settings in force now
            write_run_file(out, plan.preset, plan.model_settings, self.cfg)
        return start, tokens

    def run(self) -> dict:
        cfg, procs, out, start = self.cfg, self.procs, self.out, self.start
        if start >= cfg.steps:
            if procs.is_main and not (out / "sample.txt").is_file():  # stopped between the last save and the end
                finish_run(out, self.model, self.plan.tokenizer, cfg, self.device, self.metrics, self.say)
            else:
                self.say(f"{out} already finished {start} of {cfg.steps} steps; nothing to do")
            return {}
        self.say(self._banner())
        result = self.evaluate(0) if start == 0 else {}
        train_time = 0.0
        # In a log file (not a terminal) a progress line every 30 s is plenty; set_postfix must not refresh it.
        progress = dict(unit="step", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
        bar = tqdm(total=cfg.steps, initial=start, disable=not procs.is_main, **progress)
        with bar, StopSignals(procs, self.device) as stop:
            started = time.perf_counter()
            for step, batch in zip(range(start, cfg.steps), self.device.loader(self.batches)):
                self.train_step(step, batch)
                self.device.barrier()  # the step barrier: on XLA the step's graph runs here, then its closures
                train_time += time.perf_counter() - started
                done, final = step + 1, step + 1 == cfg.steps
                record = self.finished.pop()
                record["tokens_per_s"] = self.tokens_per_step * (done - start) / train_time
                if procs.is_main:
                    self.metrics.append(record)
                bar.update(1)
                bar.set_postfix(
                    lm=f"{record['lm_loss']:.3f}",
                    innov=f"{record['innovation_loss'] or 0:.3f}",
                    tok_s=f"{record['tokens_per_s']:,.0f}",
                    refresh=False,
                )
                if final or _due(cfg.eval_every, done):
                    result = self.evaluate(done)
                signum = stop.requested()
                if final or _due(cfg.save_every, done) or signum is not None:
                    saved = self.save(done)
                if signum is not None and not final:
                    name = signal.Signals(signum).name
                    raise Interrupted(
                        f"stopped by {name} after step {done}: saved {saved}; continue with --resume", signum
                    )
                started = time.perf_counter()
        if procs.is_main:
            finish_run(out, self.model, self.plan.tokenizer, cfg, self.device, self.metrics, self.say, cfg.tp > 1)
        return result

    def _banner(self) -> str:
        cfg, corpus = self.cfg, self.corpus
        return (
            f"run {self.out}: {sum(p.numel() for p in self.model.parameters()):,} parameters"
            + (f" ({self.trainable:,} trainable: {cfg.trainable})" if cfg.trainable != "all" else "")
            + (f", distilled from {cfg.teacher}" if cfg.teacher else "")
            + (", activation checkpointing" if cfg.gradient_checkpointing else "")
            + (", selective recompute" if cfg.selective_recompute else "")
            + " on "
            f"{self.device.torch_device} | {len(corpus.tokens):,} tokens ({len(corpus.train_windows):,} train / "
            f"{len(corpus.val_windows):,} val sequences of {cfg.seq_len}) | {self.procs.world_size} process(es) x "
            f"{torch.get_num_threads()} thread(s)"
            + (f" | tp {cfg.tp} x dp {self.ctx.dp_size}{' | ZeRO-1' if cfg.zero1 else ''}" if self.parallel else "")
        )

    def tokens_after(self, done: int) -> int:
        """Tokens seen after ``done`` steps: continues from the checkpoint's count, whatever the batch is now."""
        return self.start_tokens + (done - self.start) * self.tokens_per_step

    def train_step(self, step: int, batch: torch.Tensor) -> None:
        """One optimizer update on ``batch``, this process's share of the global batch of ``step`` (0-based).
        Traced only on XLA: it runs at the ``device.barrier()`` that follows."""
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr  # a new Python float each step is a graph input on XLA, not a constant: no recompile
        # loss, lm, innovation, distillation
        losses = torch.zeros(4, dtype=ptrain.DTYPES[cfg.dtype], device=self.device.torch_device)
        for k, x in enumerate(batch):
            # Gradients are averaged across processes once per step, on the last micro-batch.
            last = k == cfg.grad_accum - 1
            with nullcontext() if last or self.wrapped is model else self.wrapped.no_sync():
                with self.autocast:
                    output = self.wrapped(input_ids=x, labels=x)
                    loss, distill = output.loss, torch.zeros_like(output.loss)
                    if self.teacher is not None:
                        with torch.no_grad():
                            teacher_logits = self.teacher(input_ids=x).logits
                        distill = distill_loss(output.logits, teacher_logits)
                        loss = loss + cfg.distill_weight * distill
                (loss / cfg.grad_accum).backward()
            has_innovation = output.innovation_loss is not None
            innovation = output.innovation_loss if has_innovation else torch.zeros_like(output.loss)
            losses += torch.stack([loss, output.lm_loss, innovation, distill]).detach().to(losses.dtype)
        # The global batch's loss: all sequences have seq_len tokens, so it is the mean of the micro-batch means.
        losses = all_sum(losses, self.data_procs) / (cfg.grad_accum * self.data_procs.world_size)
        if self.nxd is not None:
            # NxD's step: gradients averaged over the data-parallel group (ZeRO-1: reduce-scattered), the global
            # norm over the sharded parameters, clipping, the update. Its values are read after the step's graph.
            optimizer.step()
            self.device.after_step(
                self.check_and_record, step, lr, losses, self.nxd.grad_norm(optimizer), has_innovation
            )
            optimizer.zero_grad(set_to_none=True)
            return
        self.device.reduce_gradients(optimizer, self.procs.world_size)
        if cfg.tp > 1:  # the full model's gradient norm: sharded squares summed over the group, replicated once
            grad_norm = parallel_clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf, self.ctx)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        self.device.after_step(self.check_and_record, step, lr, losses, grad_norm, has_innovation)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def check_and_record(self, step: int, lr: float, losses, grad_norm, has_innovation: bool) -> None:
        """Runs when the step's values can be read: on the CPU before the update (a diverged update is never
        applied); on XLA as a step closure, after the step's graph ran (reading earlier would split it)."""
        loss, lm_loss, innovation, distill = losses.tolist()
        grad_norm = grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopped, "
                f"{newest_note(self.out)} (try a lower --lr)"
            )
        self.finished.append(
            {
                "step": step + 1,
                "split": "train",
                "loss": loss,
                "lm_loss": lm_loss,
                "innovation_loss": innovation if has_innovation else None,
                "distill_loss": distill if self.teacher is not None else None,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": self.tokens_after(step + 1),
            }
        )

    def evaluate(self, step: int) -> dict:
        cfg = self.cfg
        result = evaluate(
            self.model, self.corpus, self.eval_windows, self.batches.micro_batch, self.device, cfg.bf16, self.data_procs
        )
        if self.procs.is_main:
            self.metrics.append({"step": step, "split": "val", **result})
            plot_loss_curve(self.metrics.read(), self.out / "loss_curve.png")
        self.say(f"step {step}: validation LM loss {result['lm_loss']:.4f} (perplexity {result['perplexity']:.2f})")
        return result

    def save(self, step: int) -> Path:
        """After the step's records: a checkpoint that exists always has them (on XLA the step has run by now)."""
        cfg, procs, out = self.cfg, self.procs, self.out
        if procs.is_main:
            self.metrics.sync()
        state = {"tokens": self.tokens_after(step)}
        if self.parallel:  # every process writes its part; the last checkpoint also gets the merged model
            final = step == cfg.steps
            return ptrain.save(out, step, self.model, self.optimizer, self.ctx, state, cfg.keep_checkpoints, final)
        if procs.is_main:
            ckpt.save_checkpoint(out, step, self.model, self.optimizer, state, cfg.keep_checkpoints)
        if procs.world_size > 1 and not self.device.is_xla:
            dist.barrier()  # on XLA the next step's gradient all-reduce already waits for every process
        return ckpt.checkpoint_path(out, step)
