"""Ablation studies that decide B'MOJO's defaults: tasks x variants x learning rates x seeds, resumable.

    python -m bmojo.evals.ablation --study recall --out runs/studies --jobs 2    # the recall task mix
    python -m bmojo.evals.ablation --study lm --out runs/studies --jobs 2        # language modelling
    python -m bmojo.evals.ablation --study capacity --out runs/studies --screen  # accuracy vs state bytes
    python -m bmojo.evals.ablation --study recall --screen --variants bmojo_v0 bmojo_random ...  # 1 seed, a screen
    python -m bmojo.evals.ablation --study recall --out runs/studies --summary-only  # tables and plots again

A study trains every variant at every learning rate of one grid with every seed. A run is one (variant, lr, seed):
it is written atomically to ``OUT/<study>/<variant>/lr=<lr>_seed=<seed>.json`` when it ends, so a killed study
restarts where it was (finished runs are skipped; a run whose file is unreadable, or that failed, is run again).
A run in progress also saves its training state every ``CHECKPOINT_SECONDS`` (2 minutes) into
``.lr=<lr>_seed=<seed>.partial/`` beside its file (``bmojo.checkpoint``'s atomic, checksummed format; removed when
the run file is written, or by the next plan where a kill came in between), and the same command continues it from
there to the result of an uninterrupted run: a crash, a kill or a signal loses at most the last 2 minutes of each run
in progress. Ctrl-C ends the study at once (its workers too), with one line and exit status 130.
A run that raises (an option not implemented in this code, say) is recorded with ``"status": "failed"`` and its
error, and the study moves on. ``--jobs N`` runs N runs at once, in processes with one torch thread each. Studies
started separately on one ``--out`` (in another terminal, on the same machine) share its runs: each run
holds a lock file beside its result while it trains, and a run held or finished elsewhere is skipped.

Fair comparison, by construction:
  * Variants are named dicts of ``BMojoConfig`` overrides on top of one base B'MOJO config (``VARIANTS``); a new
    option is a new entry. Every variant's MLP is widened until its parameter count reaches the base B'MOJO's
    (``bmojo_v0``, the original design) to at least 98% of it (none may be 10% away, checked; options that add
    parameters add a few hundred); the counts are printed before training.
  * Every variant sees the same data (per seed), the same number of steps and tokens, and the same lr grid.
  * A variant that sets an issue-11 option must change the model: if its parameters and its logits equal those
    of the same config with the option at its default, the run fails ("changes nothing ... not implemented?")
    instead of silently training today's model under a new name.
  * Summary: for each variant the lr with the best mean over seeds on the VALIDATION split (recall: mean accuracy
    over all validation sets; LM: validation perplexity), then mean +- std (sample std, ddof=1) over seeds on the
    separate TEST split, and each seed's value beside it (recall studies: a per-seed table and a dot per seed in
    each task's plot; every study: ``test_by_seed`` in the JSON). Written to ``OUT/<study>/summary.{md,json}`` with
    plots, from the runs at the command's lrs, seeds and ``--variants`` only (without ``--variants``: every variant
    found in the folder, named in the summary's Regenerate command; run files outside the grid are counted, not used).

Studies (defaults; ``--steps``, ``--lrs``, ``--seeds`` override):
  recall    one model per run trained on a mix of the four tasks of ``bmojo.evals.recall`` (MQAR as zoology defines
            it, long-gap MQAR with the queries 2W+2C after the pairs, key-overwrite MQAR, phonebook) at sequence
            length 64, vocabulary 128, d=64, 2 layers, 2 heads, W=8, C=4, M=16, k=2, N=16, P=16 (mqar_sweep's
            shape); 1,200 steps of 32 examples; lrs 3e-3, 1e-2; tested per task and number of pairs.
  mqar      zoology's MQAR alone, the recall shape (training with 4, 8 and 16 pairs, tested at 2-16 pairs): the study
            the issue-11 defaults were decided on, since 1,200 steps of the four-task mix leave Mamba-2 and SWA at
            chance and the Transformer at 0.40 with 2 pairs (docs/ablation.md).
  long_gap  MQAR's long-gap variant alone (queries 2W+2C after their pairs: beyond window and fading span; trained
            and tested with 2, 4 and 8 pairs), the recall shape and budget.
  predictable_gap
            long-gap MQAR whose 64-token gap (and the query region's filler) is a counting run, predictable from its
            position, at sequence length 120 (trained and tested with 2, 4 and 8 pairs): the gap is longer than the
            memory's span past the window (M*C/k = 32 tokens), so recency selection keeps filler and random selection
            a thin sample, while a rule that keeps what the state could not predict keeps the pairs. The task where
            the selection rule, not learning, is the bottleneck.
  overwrite key-overwrite MQAR alone (later pairs reassign keys; the answer is the latest value; trained with 4 and 8
            pairs, tested with 2-12), the recall shape and budget.
  phonebook the generated phonebook lookup alone (entries "first last d1 d2", filler, the query name; the answer is
            the number's two tokens; 4, 8, 12 entries), the recall shape and budget.
  lm        byte-level LM on the embedded corpus (Python's standard library, as lm_compare) at L=128 with W=16,
            C=8, M=8, k=2: L = 4*M*C/k, so every slot is evicted ~3 times per sequence; d=64, 2 layers; 500 steps of
            16 x 128 tokens; lrs 1e-3, 3e-3, 1e-2, 3e-2. Test: perplexity at L and at 8L, and at 8L with the eidetic
            memory switched off at evaluation (same weights, ``memory_size=0``: lm_compare's ablation).
  capacity  MQAR alone (zoology's), the recall shape; each family at several state sizes (Mamba-2 N, SWA W, B'MOJO
            M, the Transformer's full KV cache); accuracy at 16 pairs against decoding-state bytes
            (``state_bytes``: the float32 tensors of an empty ``BMojoCache``, batch 1), one plot. B'MOJO is the
            defaults (``bmojo_new_M*``).

Sizing (measured on this 2-core machine, one torch thread, machine otherwise idle; every run file records its own
``seconds``, and ``summary.md`` has the mean per variant). Training step, ms (recall: 32 x 64 tokens; lm: 16 x 128):

    variant       recall step  lm step   recall run (1,200 steps + data + eval)   lm run (500 steps + eval)
    transformer       44         44        ~60 s                                    ~30 s
    swa               49         48        ~65 s                                    ~32 s
    mamba2            73         65        ~100 s                                   ~42 s
    bmojo_f           94         83        ~125 s                                   ~50 s
    bmojo_v0         132        115        ~175 s                                   ~70 s   (B'MOJO variants alike)

Under load (other agents' jobs, load average 5-10 on the 2 cores) the same runs took 2.5-3.5x longer: recall
mamba2 340 s, bmojo_v0 486 s (``runs/studies/recall``, first runs of the base study).

The final comparison, 8 variants (mamba2, swa, transformer, bmojo_f, bmojo_v0 and three B'MOJO options) x 2 lrs x
3 seeds: recall 48 runs ~ 105 CPU-min, lm 48 runs ~ 43 CPU-min; ~75 min with ``--jobs 2`` on 2 free cores:

    python -m bmojo.evals.ablation --study recall --out runs/studies --jobs 2 \
        --variants mamba2 swa transformer bmojo_f bmojo_v0 bmojo_random bmojo_recency bmojo_learned
    python -m bmojo.evals.ablation --study lm --out runs/studies --jobs 2 \
        --variants mamba2 swa transformer bmojo_f bmojo_v0 bmojo_random bmojo_recency bmojo_learned
    python -m bmojo.evals.ablation --study capacity --out runs/studies --jobs 2 --screen   # ~45 CPU-min

(Runs already in ``runs/studies`` are skipped, so variants can be added to a finished study with the same command.)
The budget is what this machine allows, not zoology's: 1,200 steps is 38,400 training examples, a small fraction
of zoology's standard sweep (and 40% of mqar_sweep's 3,000 steps), so the comparison is one of learning at an equal,
small budget; ``--steps`` scales every variant alike (a study's settings are part of each run file: runs made with other
settings are refused, use another ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout

from ..cache import BMojoCache
from ..checkpoint import (
    STATE_JSON,
    list_checkpoints,
    load_model,
    load_training_state,
    newest_verified,
    save_checkpoint,
    write_text_atomic,
)
from ..configuration_bmojo import V0_OPTIONS, BMojoConfig
from ..errors import BMojoError
from ..modeling_bmojo import BMojoForCausalLM
from .mqar import IGNORE_INDEX, mqar_accuracy
from .recall import generate
from .variants import parameter_count

# ---------------------------------------------------------------------------------------------------------------
# Variants: BMojoConfig overrides on top of the base B'MOJO config
# ---------------------------------------------------------------------------------------------------------------
FULL = "full"  # window_size marker: the Transformer's window covers the longest input

# Every variant but the bmojo_new family is spelled on top of V0, B'MOJO's original design (the defaults before
# issue 11), so its config, and the runs already on disk, do not change with the defaults: bmojo_v0 is the original
# model and each single-option variant is "v0 + one option". The bmojo_new family is the defaults (NEW) and the same
# model with one thing changed.
V0 = dict(V0_OPTIONS)
VARIANTS: dict[str, dict] = {
    "mamba2": dict(V0, layers_block_type="ssm", use_fading=False, memory_size=0),
    "swa": dict(V0, layers_block_type="attention", use_fading=False, memory_size=0),
    "transformer": dict(V0, layers_block_type="attention", window_size=FULL, use_fading=False, memory_size=0),
    "bmojo_f": dict(V0, memory_size=0),
    "bmojo_v0": V0,  # the original design
    "bmojo_random": dict(V0, selection_score="random"),
    "bmojo_recency": dict(V0, selection_score="recency"),
    "bmojo_next_input": dict(V0, selection_score="next_input"),
    "bmojo_learned": dict(V0, learned_selection=True),
    "bmojo_decay": dict(V0, memory_score_decay=0.9),
    "bmojo_window_exit": dict(V0, memory_admission="window_exit"),
    "bmojo_key0": dict(V0, eidetic_key_distance="zero"),
    "bmojo_self_key": dict(V0, fading_self_key=True),
    "bmojo_f_self_key": dict(V0, memory_size=0, fading_self_key=True),
    "bmojo_key_bias": dict(V0, key_set_bias=True),
    "bmojo_per_head": dict(V0, memory_per_kv_head=True),
    "bmojo_doc_reset": dict(V0, memory_reset_at_document=True),
}
# The defaults (since issue 11; chosen before the screen finished, the screen's single-option results are beside
# them): all options that give the memory a content match, a learning signal and a use for the SSM state at once;
# and the same model with innovation-only, random and recency selection at the same M: the baselines innovation
# selection must beat. NEW is what the defaults change from V0 (tests/test_ablation.py checks both).
NEW = dict(
    eidetic_key_distance="zero",
    fading_self_key=True,
    key_set_bias=True,
    learned_selection=True,
    memory_admission="window_exit",
)
VARIANTS.update(
    bmojo_new={},  # today's defaults
    bmojo_new_innovation=dict(learned_selection=False),
    bmojo_new_random=dict(learned_selection=False, selection_score="random"),
    bmojo_new_recency=dict(learned_selection=False, selection_score="recency"),
    # the learned bias on a random score: what learned selection does without the innovation score
    bmojo_new_random_learned=dict(selection_score="random"),
    # retention that refreshes on top of the defaults (the screen's bmojo_decay value): slot scores fade with age
    bmojo_new_decay=dict(memory_score_decay=0.9),
    # the baselines at M = 32: on MQAR's 64-token rows a memory that never fills (26 slots used; memory_note)
    bmojo_new_M32_random=dict(memory_size=32, learned_selection=False, selection_score="random"),
    bmojo_new_M32_recency=dict(memory_size=32, learned_selection=False, selection_score="recency"),
)
BASELINES = ("mamba2", "swa", "transformer", "bmojo_f", "bmojo_v0")

# The capacity figure: each family at several decoding-state sizes (the knob that sets the state).
CAPACITY: dict[str, dict[str, dict]] = {
    "Mamba-2 (N)": {f"mamba2_N{n}": dict(VARIANTS["mamba2"], ssm_state_size=n) for n in (8, 16, 32, 64)},
    "SWA (W)": {f"swa_W{w}": dict(VARIANTS["swa"], window_size=w) for w in (8, 16, 32)},
    "Transformer": {"transformer": VARIANTS["transformer"]},
    # the defaults users get (bmojo_new), at five memory sizes
    "B'MOJO (M)": {f"bmojo_new_M{m}": dict(memory_size=m) for m in (4, 8, 16, 32, 64)},
}
ALL_VARIANTS = {**VARIANTS, **{name: o for family in CAPACITY.values() for name, o in family.items()}}
# the config field each family's letter names (the Transformer has no knob: its cache grows with the sequence)
CAPACITY_KNOBS = {"Mamba-2 (N)": "ssm_state_size", "SWA (W)": "window_size", "B'MOJO (M)": "memory_size"}


def capacity_label(family: str, name: str) -> str:
    """The capacity plot's label of one point: its knob's value ("16"; the legend names the knob, "Mamba-2 (N)");
    "" for a family without one."""
    field = CAPACITY_KNOBS.get(family)
    return "" if field is None else str(CAPACITY[family][name][field])


# The issue-11 options: a variant setting one of them must change the model (see check_changes_model).
OPTIONS = (
    "selection_score",
    "learned_selection",
    "memory_score_decay",
    "memory_admission",
    "memory_reset_at_document",
    "memory_per_kv_head",
    "eidetic_key_distance",
    "fading_self_key",
    "key_set_bias",
    "key_set_bias_init",
)

# ---------------------------------------------------------------------------------------------------------------
# Settings of a study
# ---------------------------------------------------------------------------------------------------------------
RECALL_TASKS = (  # (task, training numbers of pairs, test numbers of pairs), all at seq_len 64
    ("mqar", (4, 8, 16), (2, 4, 8, 12, 16)),
    ("long_gap", (2, 4, 8), (2, 4, 8)),
    ("overwrite", (4, 8), (2, 4, 8, 12)),
    ("phonebook", (4, 8, 12), (4, 8, 12)),
)


@dataclass(frozen=True)
class Settings:
    """Everything a run's result depends on besides its variant, lr and seed (recorded in every run file)."""

    study: str = "recall"
    protocol: int = 1  # bump when a change to the code changes what a run computes: old runs are then not reused
    vocab_size: int = 128
    seq_len: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    window: int = 8
    chunk: int = 4
    memory_size: int = 16
    selections_per_chunk: int = 2
    ssm_state_size: int = 16
    ssm_head_dim: int = 16
    steps: int = 1200
    batch_size: int = 32
    weight_decay: float = 0.1
    tasks: tuple = RECALL_TASKS
    val_examples: int = 200  # per task and number of pairs
    test_examples: int = 500
    eval_multiple: int = 8  # lm: test perplexity at seq_len and at eval_multiple * seq_len
    val_windows: int = 16  # lm: held-out windows of eval_multiple * seq_len tokens, for lr selection
    test_windows: int = 32  # lm: other held-out windows, for the reported numbers
    lm_data: str = "stdlib"  # lm: the embedded corpus (Python's standard library)
    filler_gap: int = 0  # long_gap / predictable_gap filler length; 0: 2W + 2C

    @property
    def gap(self) -> int:
        # long-gap queries lie beyond window + fading span (2W + 2C) unless a study sets a longer gap
        return self.filler_gap or 2 * self.window + 2 * self.chunk

    @property
    def full_window(self) -> int:
        longest = self.seq_len * (self.eval_multiple if self.study == "lm" else 1)
        return self.chunk * math.ceil(longest / self.chunk)


STUDIES = {
    "recall": dict(lrs=(3e-3, 1e-2), variants=BASELINES, settings=Settings()),
    # zoology's MQAR alone (the recall mix splits 1,200 steps over four tasks: too few to learn any of them)
    "mqar": dict(
        lrs=(3e-3, 1e-2), variants=BASELINES, settings=Settings(study="mqar", tasks=(RECALL_TASKS[0],))
    ),
    # the long-gap and key-overwrite variants of MQAR alone, same shape and budget (issue 11's per-task targets)
    "long_gap": dict(
        lrs=(3e-3, 1e-2), variants=BASELINES, settings=Settings(study="long_gap", tasks=(RECALL_TASKS[1],))
    ),
    # the selection rule as the bottleneck: a 64-token predictable gap is longer than the memory's span of 32 tokens
    # past the window (M = 16 slots, 2 picks per 4-token chunk), so recency keeps filler and random a thin sample
    "predictable_gap": dict(
        lrs=(3e-3, 1e-2),
        variants=BASELINES,
        settings=Settings(
            study="predictable_gap", seq_len=120, filler_gap=64, tasks=(("predictable_gap", (2, 4, 8), (2, 4, 8)),)
        ),
    ),
    "overwrite": dict(
        lrs=(3e-3, 1e-2), variants=BASELINES, settings=Settings(study="overwrite", tasks=(RECALL_TASKS[2],))
    ),
    "phonebook": dict(
        lrs=(3e-3, 1e-2), variants=BASELINES, settings=Settings(study="phonebook", tasks=(RECALL_TASKS[3],))
    ),
    "lm": dict(
        lrs=(1e-3, 3e-3, 1e-2, 3e-2),  # 1e-2 is every variant's best (docs/eidetic.md); 3e-3 was at the edge
        variants=BASELINES,
        settings=Settings(
            study="lm", vocab_size=264, seq_len=128, window=16, chunk=8, memory_size=8, steps=500, batch_size=16
        ),
    ),
    "capacity": dict(
        lrs=(3e-3, 1e-2),
        variants=tuple(name for family in CAPACITY.values() for name in family),
        settings=Settings(study="capacity", tasks=(("mqar", (4, 8, 16), (8, 16)),)),
    ),
}
CAPACITY_PAIRS = 16  # the capacity plot's number of pairs

# Tiny settings (seconds per run) for smoke tests.
QUICK = dict(hidden_size=16, num_layers=1, steps=4, batch_size=4, val_examples=4, test_examples=4)
QUICK_LM = dict(QUICK, seq_len=32, window=8, chunk=4, memory_size=2, eval_multiple=2, val_windows=1, test_windows=1)


# ---------------------------------------------------------------------------------------------------------------
# Configs at equal parameters
# ---------------------------------------------------------------------------------------------------------------
def base_fields(s: Settings) -> dict:
    return dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        window_size=s.window,
        chunk_size=s.chunk,
        memory_size=s.memory_size,
        selections_per_chunk=s.selections_per_chunk,
        ssm_state_size=s.ssm_state_size,
        ssm_head_dim=s.ssm_head_dim,
    )


def make_config(s: Settings, overrides: dict, intermediate_size: int | None = None) -> BMojoConfig:
    """The base B'MOJO config of ``s`` with ``overrides`` (``layers_block_type`` may be one layer type for every
    layer; ``window_size="full"`` is the Transformer's window)."""
    fields = dict(base_fields(s), **overrides)
    if isinstance(fields.get("layers_block_type"), str):
        fields["layers_block_type"] = [fields["layers_block_type"]] * s.num_layers
    if fields.get("window_size") == FULL:
        fields["window_size"] = s.full_window
    return BMojoConfig(**fields, intermediate_size=intermediate_size)


def matched_config(s: Settings, overrides: dict) -> BMojoConfig:
    """``make_config`` with the MLP widened (steps of 8) until the parameter count reaches 98% of the base
    B'MOJO's (``bmojo_v0``); a variant more than 10% away from it raises ValueError."""
    target = parameter_count(make_config(s, V0))
    config = make_config(s, overrides)
    while parameter_count(config) < 0.98 * target:
        config = make_config(s, overrides, config.intermediate_size + 8)
    if abs(parameter_count(config) - target) > 0.1 * target:
        raise ValueError(
            f"cannot match {overrides} to the base B'MOJO's {target} parameters: {parameter_count(config)}"
        )
    return config


def state_bytes(config: BMojoConfig) -> int:
    """Bytes of the float32 decoding state of one sequence: every tensor of an empty ``BMojoCache`` (SSM states,
    convolution tails, attention rings with their positions, eidetic memory), which never grows with the input."""
    return BMojoCache.empty(config, batch_size=1).nbytes()


def memory_slots_used(config: BMojoConfig, seq_len: int) -> int:
    """The most eidetic-memory slots any layer holds after one row of ``seq_len`` tokens (read from the decoding
    cache of a forward with ``use_cache=True`` on random tokens without document ends; the number of picks does not
    depend on their content); 0 without a memory. Below ``config.memory_size`` the memory never fills on rows of
    the study's length: nothing is evicted, and every larger memory computes the same function there."""
    if config.memory_size == 0 or "bmojo" not in config.layers_block_type:
        return 0
    torch.manual_seed(0)
    model = BMojoForCausalLM(config).eval()
    x = torch.randint(3, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    if config.eos_token_id is not None:
        x[x == config.eos_token_id] = 3
    with torch.no_grad():
        cache = model(input_ids=x, use_cache=True).cache
    held = [
        int((layer.eidetic.mem_score >= 0).sum(-1).max())
        for layer in cache.layers
        if getattr(layer, "eidetic", None) is not None
    ]
    return max(held, default=0)


def memory_note(name: str, config: BMojoConfig, seq_len: int) -> str | None:
    """One line when ``config``'s memory never fills in a row of ``seq_len`` tokens (see ``memory_slots_used``)."""
    used = memory_slots_used(config, seq_len)
    if 0 < config.memory_size and used < config.memory_size:
        return (
            f"{name}: its memory never fills in a {seq_len}-token row ({used} of {config.memory_size} slots after the"
            f" last token): nothing is evicted, and any memory_size >= {used} is the same model here"
        )
    return None


def check_changes_model(config: BMojoConfig, seq_len: int) -> None:
    """Raise RuntimeError when the issue-11 options ``config`` sets away from the original design (``V0``) change
    neither the parameters nor the logits (on a sequence long enough to evict memory, with document ends in it) of
    the same config with them at their v0 values."""
    default = BMojoConfig()
    original = {name: V0.get(name, getattr(default, name)) for name in OPTIONS}
    changed = {name: getattr(config, name) for name in OPTIONS if getattr(config, name) != original[name]}
    if not changed:
        return
    reference = BMojoConfig.from_dict({**config.to_dict(), **{name: original[name] for name in changed}})
    torch.manual_seed(0)
    model = BMojoForCausalLM(config).eval()
    torch.manual_seed(0)
    ref = BMojoForCausalLM(reference).eval()
    if set(model.state_dict()) != set(ref.state_dict()):
        return
    model.load_state_dict(ref.state_dict())
    evict = 4 * config.memory_size * config.chunk_size // max(1, config.selections_per_chunk)
    length = config.chunk_size * math.ceil(max(seq_len, evict, 2 * config.window_size) / config.chunk_size)
    x = torch.randint(3, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    x[:, length // 3] = x[:, 2 * length // 3] = config.eos_token_id or 2  # documents, for memory_reset_at_document
    with torch.no_grad():
        if torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits):
            raise RuntimeError(
                f"{', '.join(f'{k}={v!r}' for k, v in changed.items())} changes nothing in this code "
                "(same parameters, same logits as without it): not implemented on this branch?"
            )


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------
def _schedule(optimizer, steps: int):
    """Linear warm-up over the first 10% of the steps, then cosine decay (as mqar_sweep)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min(1.0, (t + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * t / steps))
    )


CHECKPOINT_SECONDS = 120.0  # a run in progress saves its training state this often (wall clock)


class RunCheckpoints:
    """A run's training state in ``folder`` (``bmojo.checkpoint``'s format, the newest save kept): saved by
    ``_train`` every ``CHECKPOINT_SECONDS`` and found there by the next attempt at the run, which continues from it
    to the result an uninterrupted run gives (model, AdamW moments, lr schedule, torch RNG, the data stream's RNG
    and the last losses are all restored). A save that cannot be used (made with another config, settings or lr;
    damaged; malformed) is deleted and the run starts again from step 0, with a message; a save that fails (a full
    disk) is reported and training goes on: the checkpoints never fail a run. After ``_train``:
    ``resumed_at_step`` (0: from the start) and ``seconds_before`` (training time of the earlier attempts)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.resumed_at_step, self.seconds_before = 0, 0.0
        self._save_failed = False

    def resume(self, identity: dict, model, optimizer, schedule, data_rng) -> tuple[int, list[float]]:
        """Restore the newest save into ``model``, ``optimizer``, ``schedule`` and ``data_rng`` (a numpy Generator
        or None): ``(its step, its last losses)``. ``(0, [])`` when there is none to use; ``model``, the torch RNG
        and ``data_rng`` are then as they were, and ``optimizer`` and ``schedule`` must be made anew."""
        if not self.folder.exists() and not self.folder.is_symlink():
            return 0, []
        model_state = {k: v.clone() for k, v in model.state_dict().items()}
        torch_rng = torch.get_rng_state()
        data_state = None if data_rng is None else data_rng.bit_generator.state
        try:
            if not list_checkpoints(self.folder):
                raise BMojoError("it holds no complete save")
            checkpoint, _ = newest_verified(self.folder, warn=lambda message: print(message, file=sys.stderr))
            state = json.loads((checkpoint / STATE_JSON).read_text())
            if not isinstance(state, dict) or state.get("identity") != identity:
                raise BMojoError(f"{checkpoint} was saved with another config, settings or lr")
            step, losses, seconds = state["step"], list(state["losses"]), float(state["seconds"])
            model.load_state_dict(load_model(checkpoint).state_dict())
            load_training_state(checkpoint, optimizer)  # AdamW moments, lr, the torch RNG
            schedule.load_state_dict(state["schedule"])
            if data_rng is not None:
                data_rng.bit_generator.state = state["data_rng"]
        except Exception as error:  # any save it cannot use: start again, as if there were none
            model.load_state_dict(model_state)
            torch.set_rng_state(torch_rng)
            if data_rng is not None:
                data_rng.bit_generator.state = data_state
            print(f"not resuming from {self.folder} ({error}); deleted, training from step 0", file=sys.stderr)
            self.remove()  # else its higher step would outrank, and delete, this attempt's saves
            return 0, []
        print(f"resuming from {checkpoint} (step {step})", file=sys.stderr, flush=True)
        self.resumed_at_step, self.seconds_before = step, seconds
        return step, losses

    def save(self, step: int, identity: dict, model, optimizer, schedule, data_rng, losses, seconds, tokens):
        state = dict(identity=identity, losses=losses[-10:], seconds=seconds, tokens=tokens)
        state["schedule"] = schedule.state_dict()  # its lambda is code, saved as None: its step and lrs are state
        state["data_rng"] = None if data_rng is None else data_rng.bit_generator.state
        try:
            save_checkpoint(self.folder, step, model, optimizer, state, keep=1)
        except Exception as error:  # the run goes on; only what a kill would lose grows
            if not self._save_failed:
                print(f"cannot save the run's training state ({error}); training goes on", file=sys.stderr)
            self._save_failed = True

    def remove(self) -> None:
        if self.folder.is_dir() and not self.folder.is_symlink():
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.folder.unlink(missing_ok=True)


def _train(model, lr: float, s: Settings, loss_at, checkpoints: RunCheckpoints | None = None, data_rng=None) -> float:
    """AdamW (weight decay ``s.weight_decay``, gradients clipped at 1) for ``s.steps`` steps; ``loss_at(step)`` is
    that step's loss (drawing its batch from ``data_rng``, a numpy Generator, when the data stream is not a function
    of the step). With ``checkpoints`` the run continues from its last save there and saves every
    ``CHECKPOINT_SECONDS``. Returns the mean loss of the last 10 steps."""

    def fresh():
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=s.weight_decay)
        return optimizer, _schedule(optimizer, s.steps)

    optimizer, schedule = fresh()
    # what a save must match to be continued (JSON-normal: tuples as lists); the seed is in the run's file name
    identity = json.loads(json.dumps({"config": model.config.to_dict(), "settings": asdict(s), "lr": lr}))
    start, losses = 0, []
    if checkpoints is not None:
        start, losses = checkpoints.resume(identity, model, optimizer, schedule, data_rng)
        if start == 0:
            optimizer, schedule = fresh()  # a save that failed to load may have changed them
    began = last_save = time.monotonic()
    model.train()
    for step in range(start, s.steps):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if checkpoints is not None and step + 1 < s.steps and time.monotonic() - last_save >= CHECKPOINT_SECONDS:
            seconds = checkpoints.seconds_before + time.monotonic() - began
            tokens = (step + 1) * s.batch_size * s.seq_len
            checkpoints.save(step + 1, identity, model, optimizer, schedule, data_rng, losses, seconds, tokens)
            last_save = time.monotonic()
    model.eval()
    return float(np.mean(losses[-10:]))


def recall_sets(s: Settings, split: str, seed: int = 0) -> dict:
    """``split``: "train" (the mix, seeded by the run's seed, ``steps * batch_size`` examples shuffled), "val" or
    "test" ({"task kv=p": (inputs, labels)}, the same for every run). Seed ranges keep the splits apart."""
    if split == "train":
        parts = [(t, p, i, j) for i, (t, train, _) in enumerate(s.tasks) for j, p in enumerate(train)]
        per = -(-s.steps * s.batch_size // len(parts))
        made = [
            generate(t, s.vocab_size, per, s.seq_len, 100_000 * (seed + 1) + 100 * i + j, p, s.gap)
            for t, p, i, j in parts
        ]
        inputs, labels = torch.cat([b.inputs for b in made]), torch.cat([b.labels for b in made])
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))[: s.steps * s.batch_size]
        return {"train": (inputs[order], labels[order])}
    base, count = {"val": (10_000, s.val_examples), "test": (20_000, s.test_examples)}[split]
    sets = {}
    for i, (task, _, test) in enumerate(s.tasks):
        for j, p in enumerate(test):
            b = generate(task, s.vocab_size, count, s.seq_len, base + 100 * i + j, p, s.gap)
            sets[f"{task} kv={p}"] = (b.inputs, b.labels)
    return sets


@torch.no_grad()
def recall_accuracy(model, sets: dict) -> dict:
    return {
        key: float(
            torch.cat(
                [mqar_accuracy(model(input_ids=xb).logits, yb) for xb, yb in zip(x.split(100), y.split(100))]
            ).mean()
        )
        for key, (x, y) in sets.items()
    }


def train_recall(
    config: BMojoConfig, lr: float, seed: int, s: Settings, checkpoints: RunCheckpoints | None = None
) -> tuple[BMojoForCausalLM, float]:
    """A recall run's training: ``(trained model in eval mode, mean loss of the last 10 steps)``; with
    ``checkpoints``, continued from its last save there and saved as it goes (``_train``)."""
    x, y = recall_sets(s, "train", seed)["train"]
    torch.manual_seed(seed)
    model = BMojoForCausalLM(config)

    def loss_at(step):
        out = model(input_ids=x[step * s.batch_size : (step + 1) * s.batch_size])
        labels = y[step * s.batch_size : (step + 1) * s.batch_size]
        # recall labels are aligned with the inputs (the target of position i is labels[i]): no shift
        loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        if out.innovation_loss is not None:
            loss = loss + config.innovation_loss_weight * out.innovation_loss
        return loss

    return model, _train(model, lr, s, loss_at, checkpoints)


def run_recall(
    config: BMojoConfig, lr: float, seed: int, s: Settings, checkpoints: RunCheckpoints | None = None
) -> dict:
    model, final_loss = train_recall(config, lr, seed, s, checkpoints)
    val = recall_accuracy(model, recall_sets(s, "val"))
    return {
        "final_loss": final_loss,
        "val": val,
        "test": recall_accuracy(model, recall_sets(s, "test")),
        "val_score": float(np.mean(list(val.values()))),
    }


@lru_cache(maxsize=1)
def lm_corpus(window: int, data: str):
    """The byte-tokenized corpus cut into windows of ``window`` (the longest test length); its held-out windows are
    split into validation and test, the training sequences are cut from the other windows (never held out)."""
    from ..data import load_corpus
    from ..tokenization import load_tokenizer

    return load_corpus([data], load_tokenizer("byte"), window, val_fraction=0.01)


def run_lm(config: BMojoConfig, lr: float, seed: int, s: Settings, checkpoints: RunCheckpoints | None = None) -> dict:
    from .lm_compare import ablated, perplexity_by_length

    long = s.eval_multiple * s.seq_len
    corpus = lm_corpus(long, s.lm_data)
    if len(corpus.val_windows) < s.val_windows + s.test_windows:
        raise ValueError(f"the corpus holds {len(corpus.val_windows)} held-out windows of {long}, need more")
    val = corpus.batch(corpus.val_windows[: s.val_windows])
    test = corpus.batch(corpus.val_windows[s.val_windows : s.val_windows + s.test_windows])
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = BMojoForCausalLM(config)

    def loss_at(step):  # the batch comes from rng's stream, restored on resume
        windows = rng.choice(corpus.train_windows, size=s.batch_size)
        offsets = rng.integers(0, s.eval_multiple, size=s.batch_size) * s.seq_len
        x = torch.stack([corpus.batch([w])[0, o : o + s.seq_len] for w, o in zip(windows, offsets)])
        return model(input_ids=x, labels=x).loss  # includes the innovation loss, as `bmojo train`

    final_loss = _train(model, lr, s, loss_at, checkpoints, data_rng=rng)
    batch_tokens = 8 * long
    val_ppl = perplexity_by_length(model, val, (s.seq_len,), batch_tokens)[s.seq_len]
    ppl = perplexity_by_length(model, test, (s.seq_len, long), batch_tokens)
    result = {f"ppl@{s.seq_len}": ppl[s.seq_len], f"ppl@{long}": ppl[long]}
    if config.memory_size > 0:  # the trained weights with the eidetic memory switched off at evaluation
        off = perplexity_by_length(ablated(model, {"memory_size": 0}), test, (s.seq_len, long), batch_tokens)
        result.update({f"ppl@{s.seq_len} memory off": off[s.seq_len], f"ppl@{long} memory off": off[long]})
        result[f"memory off cost @{long} (%)"] = 100 * (off[long] / ppl[long] - 1)
    return {"final_loss": final_loss, "val": {f"ppl@{s.seq_len}": val_ppl}, "test": result, "val_score": val_ppl}


def run_path(out: Path, s: Settings, variant: str, lr: float, seed: int) -> Path:
    return out / s.study / variant / f"lr={lr:g}_seed={seed}.json"


def run_spec(s: Settings, variant: str, overrides: dict, config, lr: float, seed: int) -> dict:
    """What a run's result depends on; a finished run is reused only when its spec is this one. The overrides are
    written with every issue-11 option explicit (the defaults' values where the variant sets none), so a run file
    says which model it trained whatever the defaults become."""
    default = BMojoConfig()
    return json.loads(
        json.dumps(
            dict(
                settings=asdict(s),
                variant=variant,
                overrides={**{name: getattr(default, name) for name in OPTIONS}, **overrides},
                intermediate_size=getattr(config, "intermediate_size", None),
                lr=lr,
                seed=seed,
            )
        )
    )


def write_atomic(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1))  # a reader sees the whole file or none


def execute(spec: dict, path: str) -> dict:
    """Train and evaluate one run; write its record (status "ok" or "failed" with the error) to ``path``.

    The run holds ``.<file name>.lock`` beside its file while it trains, so studies started in several processes on
    one ``--out`` share the work instead of repeating it: a run another process holds, or finished successfully
    since this process planned its list, is not trained and comes back as ``{"status": "skipped", "reason": ...}``
    (not written); one that other process finished with another spec (other settings on the same ``--out``) comes
    back failed, its file left alone. (The lock is ``flock``'s, released when a process dies; where a filesystem
    has no ``flock``, ``filelock`` falls back to a lock file that a crash can leave behind: delete it.)"""
    if _study_pid is not None and os.getppid() != _study_pid:
        os._exit(1)  # a worker whose study was killed: start none of the runs still queued to it (_worker_init)
    run_file = Path(path)
    run_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_file.with_name(f".{run_file.name}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return {"status": "skipped", "reason": "another process is running it", "spec": spec}
    try:
        done = read_run(run_file)
        if done is not None and done["status"] == "ok":
            if done["spec"] != spec:
                error = f"ValueError: {run_file} was run with other settings by another process; use another --out"
                return {"status": "failed", "error": error, "spec": spec}
            return {"status": "skipped", "reason": "another process finished it", "spec": spec}
        return _train_and_write(spec, run_file)
    finally:
        lock.release()


def partial_dir(run_file: Path) -> Path:
    """Where a run in progress keeps its checkpoints: ``.<run file stem>.partial/`` beside its file."""
    return run_file.with_name(f".{run_file.stem}.partial")


def _train_and_write(spec: dict, path: Path) -> dict:
    torch.set_num_threads(1)
    started = time.time()
    checkpoints = RunCheckpoints(partial_dir(path))
    s = Settings(
        **{**spec["settings"], "tasks": tuple((t, tuple(a), tuple(b)) for t, a, b in spec["settings"]["tasks"])}
    )
    try:
        config = make_config(s, spec["overrides"], spec["intermediate_size"])
        record = {"status": "ok", "parameters": parameter_count(config), "state_bytes": state_bytes(config)}
        check_changes_model(config, s.seq_len)
        runner = run_lm if s.study == "lm" else run_recall
        record.update(runner(config, spec["lr"], spec["seed"], s, checkpoints))
    except Exception as error:  # recorded, and the study moves on
        record = {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    record.update(spec=spec, seconds=checkpoints.seconds_before + time.time() - started)
    if checkpoints.resumed_at_step:
        record["resumed_at_step"] = checkpoints.resumed_at_step
    write_atomic(path, record)
    checkpoints.remove()  # after the record: a crash in between resumes and writes the same record again
    return record


def same_settings(spec_settings: dict, s: Settings) -> bool:
    """Whether a run file's settings are ``s`` (fields added to ``Settings`` since it ran take their defaults)."""
    try:
        old = Settings(
            **{**spec_settings, "tasks": tuple((t, tuple(a), tuple(b)) for t, a, b in spec_settings["tasks"])}
        )
    except TypeError:  # a field that no longer exists
        return False
    return old == s


def read_run(path: Path) -> dict | None:
    """A run's record, or None when it is missing or unreadable (a partial write: run it again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "status" in record and "spec" in record else None


# ---------------------------------------------------------------------------------------------------------------
# A study
# ---------------------------------------------------------------------------------------------------------------
def plan(s: Settings, variants, lrs, seeds, out: Path):
    """The configs (printed) and the runs still to do: [(spec, path)], seed-major so that an interrupted study has
    every variant at the first seeds."""
    configs = {}
    for name in variants:
        if name not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
        try:
            configs[name] = matched_config(s, ALL_VARIANTS[name])
        except ValueError as error:  # the run fails the same way and records it
            configs[name] = error
    todo = []
    for seed in seeds:
        for name, config in configs.items():
            for lr in lrs:
                spec = run_spec(s, name, ALL_VARIANTS[name], config, lr, seed)
                path = run_path(out, s, name, lr, seed)
                done = read_run(path)
                if done is not None and done["status"] == "ok":
                    # Run files from before the issue-11 defaults name only the options they set: the others had
                    # their v0 values then (V0 fills them; a newer file has them all, which V0 leaves alone).
                    old = dict(done["spec"], settings=None, overrides={**V0, **done["spec"]["overrides"]})
                    if old != dict(spec, settings=None) or not same_settings(done["spec"]["settings"], s):
                        raise ValueError(f"{path} was run with other settings; use another --out (or remove it)")
                    # saves left by a process killed between writing the record and removing them: never read again
                    RunCheckpoints(partial_dir(path)).remove()
                    continue
                todo.append((spec, str(path)))
    return configs, todo


def run_study(s: Settings, variants, lrs, seeds, out: Path, jobs: int = 1) -> list[dict]:
    """Run what ``plan`` says is still to do; returns the records of the runs this call trained (skipped ones are
    reported on the progress bar, not returned). Warns when runs were left to another process still training them:
    the summary written next misses them until the last study to finish writes its own (or ``--summary-only``)."""
    from tqdm import tqdm

    configs, todo = plan(s, variants, lrs, seeds, out)
    print(f"study {s.study}: base B'MOJO fields {base_fields(s)}; {s.steps} steps of {s.batch_size} x {s.seq_len}")
    for name, config in configs.items():
        if isinstance(config, Exception):
            print(f"  {name:18s} cannot be built: {config}")
            continue
        print(
            f"  {name:18s} {parameter_count(config):>9,} parameters  state {state_bytes(config):>8,} B  "
            f"intermediate_size {config.intermediate_size}  overrides {ALL_VARIANTS[name]}"
        )
        note = memory_note(name, config, s.seq_len)
        if note:
            print(f"    note: {note}")
    total = len(variants) * len(lrs) * len(seeds)
    print(f"{total - len(todo)} of {total} runs already done in {out / s.study}; {len(todo)} to run", flush=True)
    records, held = [], []
    with tqdm(total=len(todo), desc=f"{s.study} runs", unit="run") as bar:

        def finished(record):
            spec = record["spec"]
            bar.set_postfix_str(f"{spec['variant']} lr={spec['lr']:g} seed={spec['seed']}: {record['status']}")
            if record["status"] == "failed":
                tqdm.write(f"FAILED {spec['variant']} lr={spec['lr']:g} seed={spec['seed']}: {record['error']}")
            if record["status"] == "skipped":
                tqdm.write(f"skipped {spec['variant']} lr={spec['lr']:g} seed={spec['seed']}: {record['reason']}")
                if record["reason"] == "another process is running it":
                    held.append(record)
            else:
                records.append(record)
            bar.update(1)

        if jobs <= 1:
            for spec, path in todo:
                finished(execute(spec, path))
        else:
            others = set(multiprocessing.active_children())  # the caller's own children: not the pool's to stop
            pool = ProcessPoolExecutor(
                jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(),)
            )
            try:
                for future in as_completed([pool.submit(execute, spec, path) for spec, path in todo]):
                    finished(future.result())
            except BaseException:
                # Ctrl-C, say: leaving a ``with`` block would wait for every queued run to be trained (workers ignore
                # SIGINT, so a terminal's Ctrl-C reaches this process alone). The runs in progress keep their last
                # save and the same command resumes them. A second Ctrl-C must not break off this clean-up.
                with _sigint_ignored():
                    pool.shutdown(wait=False, cancel_futures=True)
                    workers = set(multiprocessing.active_children()) - others
                    for worker in workers:
                        worker.terminate()
                    for worker in workers:
                        worker.join(10)
                        if worker.is_alive():
                            worker.kill()
                            worker.join()
                    pool.shutdown(wait=True)  # joins the pool's threads now, not at exit
                raise
            pool.shutdown()
    if held:
        print(
            f"{len(held)} runs were still being trained by another process: the summary written now lacks them; the "
            "last study to finish writes one complete for its grid (or run this command again with --summary-only)"
        )
    return records


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored inside (from the main thread; elsewhere no signal reaches Python code anyway), then restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _one_thread():
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _quiet_saves():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per checkpoint save would drown the study's progress bar


_study_pid = None  # in a study's worker process: the study process's pid (_worker_init)


def _worker_init(study_pid: int, poll_seconds: float = 0.5) -> None:
    """A study's worker: one torch thread, and it exits as soon as the study process is gone (killed, or ended by a
    signal that skips its cleanup). Otherwise it would go on training the runs already queued to it, unseen. A run
    queued to it is never started once the study is gone (``execute`` checks first); the run in progress is dropped
    unwritten within ``poll_seconds`` (its lock dies with it), and the same command later resumes it."""
    global _study_pid
    _study_pid = study_pid
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the study process's to handle (run_study)
    _one_thread()
    _quiet_saves()

    def watch():
        while os.getppid() == study_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="study-watch", daemon=True).start()


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(records: list[dict], lower_is_better: bool) -> dict:
    """Per variant: the lr with the best mean validation score over its seeds, and that lr's test metrics as
    mean +- std over seeds and per seed (``test_by_seed``, in the order of ``seeds``: a mean can hide seeds that do
    not learn); failed runs listed. Where a variant's lrs were run on different seeds (more seeds added at the best
    lr later), the lr is chosen on the seeds every one of its lrs has (``lr_choice_seeds``; a mean over more seeds
    is a different estimate, not a better lr); the test metrics use every seed of the chosen lr."""
    by_variant: dict[str, dict[float, list[dict]]] = {}
    failed = []
    for r in records:
        spec = r["spec"]
        if r["status"] != "ok":
            failed.append({k: spec[k] for k in ("variant", "lr", "seed")} | {"error": r["error"]})
            continue
        by_variant.setdefault(spec["variant"], {}).setdefault(spec["lr"], []).append(r)
    variants = {}
    order = list(ALL_VARIANTS)
    for name, by_lr in sorted(
        by_variant.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 1e9, kv[0])
    ):
        common = set.intersection(*({r["spec"]["seed"] for r in runs} for runs in by_lr.values()))
        if not common:
            print(f"{name}: its lrs share no seed; the best lr is chosen on each lr's own seeds")
        val = {
            lr: mean_std([r["val_score"] for r in runs if not common or r["spec"]["seed"] in common])[0]
            for lr, runs in by_lr.items()
        }
        best = (min if lower_is_better else max)(val, key=val.get)
        runs = sorted(by_lr[best], key=lambda r: r["spec"]["seed"])
        test = {k: mean_std([r["test"][k] for r in runs]) for k in runs[0]["test"]}
        variants[name] = {
            "best_lr": best,
            "val_by_lr": {f"{lr:g}": v for lr, v in sorted(val.items())},
            "seeds_by_lr": {f"{lr:g}": sorted(r["spec"]["seed"] for r in by_lr[lr]) for lr in sorted(by_lr)},
            "lr_choice_seeds": sorted(common) if common else None,
            "seeds": [r["spec"]["seed"] for r in runs],
            "parameters": runs[0]["parameters"],
            "state_bytes": runs[0]["state_bytes"],
            "test": {k: {"mean": m, "std": sd} for k, (m, sd) in test.items()},
            "test_by_seed": {k: [r["test"][k] for r in runs] for k in runs[0]["test"]},
            "seconds_per_run": mean_std([r["seconds"] for lr_runs in by_lr.values() for r in lr_runs])[0],
        }
    return {"variants": variants, "failed": failed}


def load_records(out: Path, s: Settings) -> list[dict]:
    """Every readable run of study ``s`` under ``out`` made with these settings."""
    records = [read_run(p) for p in sorted((out / s.study).glob("*/*.json"))]
    return [r for r in records if r is not None and same_settings(r["spec"]["settings"], s)]


def _cell(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def write_summary(out: Path, s: Settings, command: str, lrs=None, seeds=None, variants=None) -> dict:
    """Summarize the runs of ``s`` under ``out`` into ``OUT/<study>/summary.{json,md}`` and plots; returns the
    summary. With ``lrs``, ``seeds`` and ``variants`` (the command's grid; ``variants`` None: every variant found)
    only runs of that grid count (run files of other lrs, seeds or variants in the folder are left out, and their
    number printed): the summary is what ``command`` regenerates. Studies in several processes on one ``--out``
    write it one at a time (``.summary.lock``), each from the run files it reads once it holds the lock, so the last
    writer's summary has every run finished before it."""
    folder = out / s.study
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".summary.lock"):
        return _write_summary(folder, out, s, command, lrs, seeds, variants)


def in_grid(record: dict, lrs=None, seeds=None, variants=None) -> bool:
    """Whether a run's lr is one of ``lrs``, its seed one of ``seeds`` and its variant one of ``variants`` (None:
    any)."""
    spec = record["spec"]
    lr_ok = lrs is None or any(math.isclose(spec["lr"], lr, rel_tol=1e-9) for lr in lrs)
    variant_ok = variants is None or spec["variant"] in variants
    return lr_ok and variant_ok and (seeds is None or spec["seed"] in seeds)


def _write_summary(folder: Path, out: Path, s: Settings, command: str, lrs=None, seeds=None, variants=None) -> dict:
    from matplotlib.figure import Figure  # the object API: no GUI backend, no global state

    found = load_records(out, s)
    records = [r for r in found if in_grid(r, lrs, seeds, variants)]
    grid = f"lrs {' '.join(f'{lr:g}' for lr in lrs or ())}, seeds {' '.join(map(str, seeds or ()))}"
    if variants is not None:
        grid += f", variants {' '.join(variants)}"
    other_settings = sum(read_run(p) is not None for p in folder.glob("*/*.json")) - len(found)
    if other_settings:
        print(f"{other_settings} run files in {folder} were made with other settings (--steps, --quick): not used")
    if len(records) < len(found):
        print(f"{len(found) - len(records)} run files in {folder} are outside this command's grid ({grid}): not used")
    if not records and (found or other_settings):  # a typo in the grid must not blank a summary
        raise SystemExit(f"error: no run in {folder} has these settings and {grid}: the summary was not written")
    summary = summarize(records, lower_is_better=s.study == "lm")
    absent = [n for n in variants or () if n not in summary["variants"]]
    if absent:
        print(f"no finished run of {', '.join(absent)} in {folder} at this grid: not in the summary")
    if variants is None and summary["variants"]:
        # without --variants the command would train the study's default variants, which need not be those found
        command += " --variants " + " ".join(summary["variants"])
    summary.update(command=command, settings=asdict(s), grid={"lrs": lrs, "seeds": seeds})
    if variants is not None:
        summary["grid"]["variants"] = list(variants)
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=1))
    variants = summary["variants"]
    lines = [
        f"# Ablation study `{s.study}`",
        "",
        f"Regenerate: `{command}`",
        "",
        f"Settings: {json.dumps({k: v for k, v in asdict(s).items() if k != 'tasks'})}",
        "",
        "Each variant at its best lr (mean validation score over seeds); test mean ± std over seeds.",
        "",
    ]
    for n, v in variants.items():
        if len({tuple(seeds) for seeds in v["seeds_by_lr"].values()}) > 1:
            by_lr = "; ".join(f"lr {lr}: seeds {' '.join(map(str, seeds))}" for lr, seeds in v["seeds_by_lr"].items())
            chosen_on = (
                "on each lr's own seeds (they share none)"
                if v["lr_choice_seeds"] is None
                else f"on the seeds all of them have ({' '.join(map(str, v['lr_choice_seeds']))})"
            )
            lines += [f"{n} was run on different seeds per lr ({by_lr}): its lr is chosen {chosen_on}.", ""]
    header = "| variant | parameters | state bytes | best lr | seeds | s/run |"

    def meta(n, v):
        return (
            f"| {n} | {v['parameters']:,} | {v['state_bytes']:,} | {v['best_lr']:g} | {len(v['seeds'])} | "
            f"{v['seconds_per_run']:.0f} |"
        )

    if s.study == "lm":
        keys = sorted({k for v in variants.values() for k in v["test"]}, key=lambda k: (len(k), k))
        lines += [header + "".join(f" {k} |" for k in keys), "|---" * (6 + len(keys)) + "|"]
        for n, v in variants.items():
            lines.append(meta(n, v) + "".join(f" {_cell(v['test'][k]) if k in v['test'] else '–'} |" for k in keys))
    for task, _, test_pairs in s.tasks if s.study != "lm" else ():
        keys = [f"{task} kv={p}" for p in test_pairs]
        lines += [
            "",
            f"## {task}",
            "",
            header + "".join(f" kv={p} |" for p in test_pairs) + " mean |",
            "|---" * (7 + len(keys)) + "|",
        ]
        for n, v in variants.items():
            mean = np.mean([v["test"][k]["mean"] for k in keys])
            lines.append(meta(n, v) + "".join(f" {_cell(v['test'][k])} |" for k in keys) + f" {mean:.3f} |")
        if any(len(v["seeds"]) > 1 for v in variants.values()):
            lines += ["", f"Per seed (at the best lr), accuracy at kv={', '.join(map(str, test_pairs))}:", ""]
            lines += ["| variant | seed | " + " | ".join(f"kv={p}" for p in test_pairs) + " |"]
            lines += ["|---|---|" + "---|" * len(keys)]
            for n, v in variants.items():
                for i, seed in enumerate(v["seeds"]):
                    cells = " | ".join(f"{v['test_by_seed'][k][i]:.3f}" for k in keys)
                    lines.append(f"| {n} | {seed} | {cells} |")
        fig = Figure(figsize=(6, 4), layout="tight")
        ax = fig.subplots()
        for i, (n, v) in enumerate(variants.items()):
            line = ax.errorbar(
                test_pairs,
                [v["test"][k]["mean"] for k in keys],
                yerr=[v["test"][k]["std"] for k in keys],
                marker="o",
                capsize=3,
                label=n,
            )
            if len(v["seeds"]) > 1:  # each seed as a dot, a little aside per variant so that none hides another
                shift = 0.012 * (max(test_pairs) - min(test_pairs)) * (i - (len(variants) - 1) / 2)
                for p, k in zip(test_pairs, keys):
                    values = v["test_by_seed"][k]
                    ax.plot([p + shift] * len(values), values, ".", color=line[0].get_color(), alpha=0.5, ms=4)
        dots = "; dots: each seed" if any(len(v["seeds"]) > 1 for v in variants.values()) else ""
        title = f"{task} (mean ± std over seeds{dots})"
        ax.set(title=title, xlabel="key-value pairs", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.savefig(folder / f"{task}.png", dpi=110)
        lines += ["", f"![{task}]({task}.png)"]
    notes = {n: memory_note(n, matched_config(s, ALL_VARIANTS[n]), s.seq_len) for n in variants if n in ALL_VARIANTS}
    unfilled = {n for n, note in notes.items() if note}
    if s.study == "capacity":
        key = f"mqar kv={CAPACITY_PAIRS}"
        fig = Figure(figsize=(6, 4), layout="tight")
        ax = fig.subplots()
        for family, members in CAPACITY.items():
            names = [n for n in members if n in variants and key in variants[n]["test"]]
            if names:
                xs = [variants[n]["state_bytes"] for n in names]
                ys = [variants[n]["test"][key]["mean"] for n in names]
                line = ax.errorbar(
                    xs, ys, yerr=[variants[n]["test"][key]["std"] for n in names], marker="o", capsize=3, label=family
                )
                below = family == "B'MOJO (M)"  # its points sit next to Mamba-2's largest and the Transformer
                for n, x, y in zip(names, xs, ys):  # which state size each point is
                    ax.annotate(capacity_label(family, n), (x, y), textcoords="offset points", ha="center",
                                xytext=(0, -12 if below else 6), fontsize=7, color=line[0].get_color())  # fmt: skip
                    if n in unfilled:  # its state bytes count slots no row fills: an open marker
                        ax.plot([x], [y], "o", mfc="white", mec=line[0].get_color(), zorder=3)
        if unfilled:
            ax.text(0.02, 0.6, f"open marker: the memory never fills\nin a {s.seq_len}-token row (Notes)",
                    transform=ax.transAxes, fontsize=7)  # fmt: skip
        ax.set(
            xscale="log",
            xlabel="decoding state (bytes, float32, batch 1)",
            ylabel=f"MQAR accuracy, {key[5:]}",
            title="Recall vs state size",
            ylim=(-0.02, 1.02),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        fig.savefig(folder / "capacity.png", dpi=110)
        lines += ["", "![capacity](capacity.png)"]
    if unfilled:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes.values() if note]
    if summary["failed"]:
        lines += ["", "## Failed runs", ""] + [
            f"- {f['variant']} lr={f['lr']:g} seed={f['seed']}: {f['error']}" for f in summary["failed"]
        ]
    write_text_atomic(folder / "summary.md", "\n".join(lines) + "\n")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=STUDIES, default="recall")
    parser.add_argument("--out", default="runs/ablation", help="folder of the run files and summaries")
    parser.add_argument(
        "--variants", nargs="+", default=None, help=f"default: the study's; any of {', '.join(ALL_VARIANTS)}"
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="the learning-rate grid (every variant)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--screen", action="store_true", help="one seed (0): a quick screen of many variants")
    parser.add_argument("--steps", type=int, default=None, help="training steps (every variant)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process and one torch thread each")
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds per run), for smoke tests")
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="run none: write the summary of the runs found at the grid's lrs, seeds and --variants (without "
        "--variants: every variant found)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    unknown = [n for n in args.variants or () if n not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(ALL_VARIANTS)}")
    _quiet_saves()
    study = STUDIES[args.study]
    settings = study["settings"]
    if args.quick:
        settings = replace(settings, **(QUICK_LM if args.study == "lm" else QUICK))
    if args.steps:
        settings = replace(settings, steps=args.steps)
    seeds = [0] if args.screen else args.seeds
    out = Path(args.out)
    # the command that regenerates the runs (and then the summary): without --summary-only, which runs none
    given = argv if argv is not None else sys.argv[1:]
    # (argparse also takes an abbreviation of --summary-only: any prefix from --su)
    command = "python -m bmojo.evals.ablation " + " ".join(
        a for a in given if not (len(a) >= 4 and "--summary-only".startswith(a))
    )
    lrs = list(args.lrs or study["lrs"])
    training = not args.summary_only
    try:
        if training:
            run_study(settings, args.variants or study["variants"], lrs, seeds, out, args.jobs)
        training = False
        # --variants narrows the summary as --lrs and --seeds do; without it every variant found is summarised (so a
        # study's default command summarises what earlier commands added to its folder)
        summary = write_summary(out, settings, command, lrs, seeds, args.variants)
    except KeyboardInterrupt:
        if training:
            print(
                f"\nablation: interrupted; the finished runs are kept in {out / settings.study} and each run in "
                f"progress resumes from its last save (at most {CHECKPOINT_SECONDS:g} s of training lost): run the "
                "same command again",
                file=sys.stderr,
            )
        else:
            print(
                f"\nablation: interrupted while writing the summary in {out / settings.study} (the runs are kept): "
                "write it again with the same command and --summary-only",
                file=sys.stderr,
            )
        raise SystemExit(130) from None
    for name, v in summary["variants"].items():
        print(
            f"{name:18s} lr={v['best_lr']:g} seeds={len(v['seeds'])} "
            + " ".join(f"{k}: {_cell(t, 3)}" for k, t in list(v["test"].items())[:6])
        )
    print(f"summary: {out / settings.study / 'summary.md'}; {len(summary['failed'])} failed runs")


if __name__ == "__main__":
    main()
