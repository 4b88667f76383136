"""The settings of a training run (``TrainConfig``), importable without torch so that ``bmojo --help`` shows their
defaults at once; ``bmojo.training`` runs them."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import BMojoError

STDLIB = "stdlib"  # the data source naming the Python standard library (bmojo.data.STDLIB)

if TYPE_CHECKING:
    from .configuration_bmojo import BMojoConfig

DEFAULT_PRESET = "cpu"


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
    decay_steps: int = 0  # the cosine reaches its floor at this step; 0: at `steps`
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    bf16: bool = False  # bfloat16 autocast
    # Recompute each decoder block's forward in the backward (BMojoModel's activation checkpointing): activation
    # memory ~ one [B, L, d] per layer, for about one more forward of the layers per step; the same numbers.
    gradient_checkpointing: bool = False
    # Recompute the attention and SSD ops in the backward (BMojoModel's selective_recompute_enable): about half the
    # saved activations, for one more forward of those two ops per step; the same numbers.
    selective_recompute: bool = False
    seed: int = 0
    device: str = "cpu"  # or "xla": Trainium through torch-xla (bmojo.devices)
    threads: int = 0  # torch threads per process; 0 = the cores, shared among the processes
    tp: int = 1  # tensor-parallel degree: processes per model replica (torchrun; bmojo.parallel.training)
    zero1: bool = False  # shard the AdamW state over the data-parallel processes (ZeRO-1)
    dtype: str = "float32"  # parameter dtype on the CPU; "float64" for the exactness tests (no flag)
    val_fraction: float = 0.01
    eval_every: int = 100  # 0: evaluate only before and after training
    eval_batches: int = 8
    save_every: int = 100  # 0: save only at the end
    keep_checkpoints: int = 2
    sample_prompt: str = "def "
    sample_tokens: int = 300
    # Priming (bmojo.priming): start from a B'MOJO directory's weights and configuration ("": a fresh model);
    # distil from a transformers model directory ("": no teacher); which parameter groups train.
    init: str = ""
    teacher: str = ""
    distill_weight: float = 1.0  # weight of KL(teacher || student) added to the loss (with a teacher)
    trainable: str = "all"
    # A new run sets every key-set bias (fading / eidetic logits) to this value before its first step; None: as
    # loaded. A converted model's sit at -30, where their gradient vanishes (bmojo.convert.GATE_INIT).
    key_set_bias_start: float | None = None

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
        cfg.init, cfg.teacher = (os.path.abspath(os.path.expanduser(p)) if p else "" for p in (cfg.init, cfg.teacher))
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
            "decay_steps",
            "eval_every",
            "save_every",
            "threads",
            "sample_tokens",
            "weight_decay",
            "grad_clip",
            "distill_weight",
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
        from .devices import DEVICES  # imports torch

        check(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}")
        check(bool(self.data), "data", "a non-empty list of data sources")
        check(
            self.seq_len >= model_config.chunk_size,
            "seq_len",
            f"at least model.chunk_size ({model_config.chunk_size}): a sequence must hold a whole chunk",
        )
        check(self.dtype in ("float32", "float64"), "dtype", "float32 or float64")
        if self.key_set_bias_start is not None:
            value = self.key_set_bias_start
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            check(number and math.isfinite(value), "key_set_bias_start", "a finite number")
        from .priming import parse_trainable

        try:
            parse_trainable(self.trainable)
        except ValueError as exc:
            raise BMojoError(f"train.trainable (--trainable): {exc}") from None
        check(self.device == "cpu" or self.dtype == "float32", "dtype", "float32 on xla")
        for name in ("gradient_checkpointing", "selective_recompute"):
            if getattr(self, name) and self.tp > 1:
                flag = "--" + name.replace("_", "-")
                raise BMojoError(f"train.{name} ({flag}) is not supported with --tp {self.tp}")
        self._check_parallel(model_config, world_size)
        dp_size = world_size // self.tp
        processes = dp_size * self.grad_accum
        which = "processes" if self.tp == 1 else f"data-parallel groups ({world_size} processes / tp {self.tp})"
        check(
            self.batch_size % processes == 0,
            "batch_size",
            f"a multiple of {which} x grad_accum ({dp_size} x {self.grad_accum})",
        )

    def _check_parallel(self, model_config: BMojoConfig, world_size: int) -> None:
        """``tp`` against the model (it divides every sharded size) and the processes (it divides their number;
        more than one needs torchrun); ``zero1`` needs torchrun; on ``xla`` both need torch-xla and
        neuronx-distributed."""
        from .parallel.plan import check_tp_size  # imports torch

        if self.tp < 1:
            raise BMojoError(f"train.tp must be at least 1, got {self.tp!r}")
        try:
            check_tp_size(model_config, self.tp)
        except ValueError as exc:
            raise BMojoError(f"--tp {self.tp}: the model's {exc}") from None
        launch = "launch with torchrun --nproc_per_node=<a multiple of the tensor-parallel degree>"
        if (self.tp > 1 or self.zero1) and world_size == 1:
            what = f"--tp {self.tp}" if self.tp > 1 else "--zero1"
            raise BMojoError(f"{what} needs a process group and this is a single process: {launch}")
        if world_size % self.tp:
            raise BMojoError(f"--tp {self.tp} must divide the number of processes ({world_size}): {launch}")
        if (self.tp > 1 or self.zero1) and self.device == "xla":
            # trn1: through neuronx-distributed (bmojo.parallel.neuron); one line now if it (or torch-xla) is missing.
            from .devices import _torch_xla
            from .parallel.neuron import import_nxd

            _torch_xla()
            import_nxd()


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


def run_file_sections(values: dict) -> dict:
    """A run's own ``train_config.yaml`` (training settings at the top level) as the sections of a ``--config``
    file (``preset``, ``model``, ``train``); any other mapping unchanged."""
    flat = set(values) - {"preset", "model", "train"}
    if "train" in values or not flat or not flat <= {f.name for f in dataclasses.fields(TrainConfig)}:
        return values
    sections = {k: values[k] for k in ("preset", "model") if k in values}
    return {**sections, "train": {k: v for k, v in values.items() if k in flat}}
