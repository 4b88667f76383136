"""Shared pieces of the XLA tier (tests/xla) and of scripts/hlo_census.py: the audited model, graph counters,
the training/decoding loops they watch, and the HLO op census.

Needs torch-xla (``.venv-xla``, see scripts/setup_xla.sh) with ``PJRT_DEVICE=CPU``: it imports torch_xla, so
nothing else in the package imports it. Set ``XLA_IR_DEBUG=1 XLA_HLO_DEBUG=1`` before torch_xla is imported to get
source locations into the census (tests/xla/conftest.py does).
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field

import torch
import torch_xla
import torch_xla.debug.metrics as met

from bmojo import BMojoForCausalLM, preset_config
from bmojo.configuration_bmojo import V0_OPTIONS
from bmojo.devices import Device

# CPU fallbacks (``aten::*`` counters: ops torch-xla cannot lower, run on the host, which splits the step graph)
# that are tolerated, each with its reason. Empty: the model lowers completely. An entry needs a justification.
ALLOWED_FALLBACKS: frozenset[str] = frozenset()

# HLO opcodes the training and decode graphs must not contain.
FORBIDDEN_OPCODES = {
    "while": "a loop in the graph; no Neuron document covers HLO while for training (docs/xla.md)",
    "conditional": "data-dependent control flow (docs/xla.md, static-graph rules)",
    "sort": "from topk/argsort; neuronx-cc handles it badly (argsort crash, aws-neuron-sdk #868)",
    "reduce-window": "from cumsum; a neuronx-cc trouble spot (docs/xla.md): prefix sums are triangular-ones matmuls",
    "set-dimension-size": "a data-dependent (dynamic) shape",
    "get-dimension-size": "a data-dependent (dynamic) shape",
}

# Where gathers and scatters may come from (``aten op @ file``, see ``origins``), and why each is acceptable: all
# have static index shapes; the indices are data (token ids) but the shapes are not.
GATHER_SCATTER_ORIGINS = {
    "aten__index_select @ torch/nn/functional.py": "the embedding lookup (F.embedding)",
    "aten__index_put @ backward (no Python frame)": "the embedding's backward: a scatter-add of token gradients",
    # Issue 11: selection moves the picked / kept rows by fixed-shape gathers (index [B, S] from argmax / rank),
    # not one-hot matmuls, so a non-finite key or value in a row that is not moved cannot spread (0 * inf = nan).
    "aten__gather @ bmojo/ops/selection/recurrent.py": "eidetic memory merge: the kept entries' rows (merge_slots)",
    "aten__gather @ bmojo/ops/selection/chunk.py": "eidetic selection: each chunk's picked rows (take_selected)",
    "aten__scatter_add @ backward (no Python frame)": "the selection gathers' backward: gradients to the moved rows",
    # The closed-form memory (memory_per_chunk_closed): a static [B, nC + 1, M + 1] bin table of pick indices, then
    # the slots' rows fetched by those indices (backward: index_put, listed above with the embedding's).
    "aten__scatter @ bmojo/ops/selection/chunk.py": "closed-form memory: each kept pick's index put in its slot's bin",
    "aten__index @ bmojo/ops/selection/chunk.py": "closed-form memory: the slots' rows fetched by pick index",
}

# Sizes used across the tier: every feature on (a "bmojo" layer with fading + eidetic memory, a sliding-window
# "attention" layer and an "ssm" layer); chunks of 4, window 8, so length 22 spans 6 chunks (the last one partial)
# and every key set (window, fading span, eidetic memory) is populated.
BATCH, LENGTH, PREFILL = 2, 22, 10


# The defaults (issue 11) turn on the self fading key, per-head key-set biases, unrotated eidetic queries, the learned
# selection bias and window-exit admission, so ``audit_config()`` audits the graphs they add; the tier also audits the
# original design (v0: none of them, picks admitted when their chunk ends).
ORIGINAL_OPTIONS = dict(V0_OPTIONS)


def audit_config(**overrides):
    return preset_config("tiny", num_hidden_layers=3, layers_block_type=["bmojo", "attention", "ssm"], **overrides)


def device() -> torch.device:
    return torch_xla.device()


def to_xla(model: BMojoForCausalLM) -> BMojoForCausalLM:
    """Move to the XLA device as ``bmojo train --device xla`` does (``Device.place_model`` ties ``lm_head`` to the
    embedding again: ``Module.to`` gives each module its own copy of a shared parameter when the tensor type
    changes)."""
    Device("xla").place_model(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "lm_head must stay tied to the embedding"
    return model


def random_ids(gen: torch.Generator, vocab: int, length: int = LENGTH) -> torch.Tensor:
    """Fresh data on the host (moving it to the device is a transfer, not a compilation)."""
    return torch.randint(0, vocab, (BATCH, length), generator=gen)


def left_padding_mask(gen: torch.Generator, length: int = LENGTH, most: int = 6) -> torch.Tensor:
    """``[BATCH, length]`` attention mask: row 0 unpadded, the others left-padded by a random 1..``most`` tokens."""
    pads = torch.randint(1, most + 1, (BATCH,), generator=gen)
    pads[0] = 0
    return (torch.arange(length)[None, :] >= pads[:, None]).long()


# Counters ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counters:
    """What torch_xla.debug.metrics says about graphs, host reads and CPU fallbacks; subtract two for a delta."""

    uncached: int  # graphs compiled
    cached: int  # graphs found in the compilation cache
    host_reads: int  # device -> host transfers (``.item()``, ``.cpu()``, ``bool(t)`` ...)
    fallbacks: dict[str, int] = field(default_factory=dict)  # aten::<op> -> count

    @property
    def executed(self) -> int:
        return self.uncached + self.cached

    def __sub__(self, other: "Counters") -> "Counters":
        names = set(self.fallbacks) | set(other.fallbacks)
        fallbacks = {n: self.fallbacks.get(n, 0) - other.fallbacks.get(n, 0) for n in names}
        return Counters(
            self.uncached - other.uncached,
            self.cached - other.cached,
            self.host_reads - other.host_reads,
            {n: c for n, c in fallbacks.items() if c},
        )


def counters() -> Counters:
    reads = met.metric_data("TransferFromDeviceTime")
    return Counters(
        met.counter_value("UncachedCompile") or 0,
        met.counter_value("CachedCompile") or 0,
        reads[0] if reads else 0,
        {n: met.counter_value(n) for n in met.counter_names() if n.startswith("aten::")},
    )


# Loops under audit ------------------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    steps: list[Counters]  # one delta per step
    losses: list[float]
    hlo: str  # the graph of a steady-state step


def run_training(model: BMojoForCausalLM, steps: int, seed: int = 0, hlo_step: int = 2) -> TrainRun:
    """``steps`` AdamW steps on fresh random batches of a fixed shape, one ``torch_xla.sync()`` per step."""
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    deltas, losses, hlo = [], [], ""
    for step in range(steps):
        before = counters()
        ids = random_ids(gen, vocab).to(device())
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == hlo_step:  # everything the sync below will compute: loss, parameters, optimizer state
            state = [t for s in optimizer.state.values() for t in s.values() if t.device.type == "xla"]
            hlo = torch_xla._XLAC._get_xla_tensors_hlo([loss, *model.parameters(), *state])
        torch_xla.sync()
        deltas.append(counters() - before)
        losses.append(loss.detach())
    return TrainRun(deltas, [float(t.cpu()) for t in losses], hlo)  # host reads only after the loop


@dataclass
class DecodeRun:
    prefill: Counters
    steps: list[Counters]  # one delta per decoded token
    hlo: str  # the graph of one decode step


def run_decode(model: BMojoForCausalLM, tokens: int, seed: int = 0) -> DecodeRun:
    """Prefill ``PREFILL`` tokens with ``use_cache=True``, then decode ``tokens`` greedy tokens one at a time; the
    next token stays on the device, so nothing needs to be read back."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        before = counters()
        out = model(random_ids(gen, model.config.vocab_size, PREFILL).to(device()), use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1)
        torch_xla.sync()
        prefill = counters() - before
        deltas, hlo = [], ""
        for step in range(tokens):
            before = counters()
            logits = model(token[:, None], cache=cache).logits
            token = logits[:, -1].argmax(-1)
            if step == 1:
                state = [t for layer in cache.layers for t in layer.tensors().values()]
                hlo = torch_xla._XLAC._get_xla_tensors_hlo([token, cache.positions, *state])
            torch_xla.sync()
            deltas.append(counters() - before)
    return DecodeRun(prefill, deltas, hlo)


# HLO census -------------------------------------------------------------------------------------------------------
# One HLO instruction: ``[ROOT] %name = <shape> <opcode>(operands), attributes``.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+ = (.+?) ([a-z][a-z0-9\-]*)\((.*)$", re.M)
_ELEMENT_TYPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[")
_OP_TYPE = re.compile(r'op_type="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)" source_line=(\d+)')
# Data-dependent (bounded dynamic) dimensions are printed as ``<=N`` or ``?`` inside a shape.
_DYNAMIC_DIM = re.compile(r"\[[^\]]*(<=|\?)[^\]]*\]")
# Ops whose presence deserves a look on Neuron: the census lists where each comes from.
TRACED_OPCODES = ("gather", "scatter", "dynamic-slice", "dynamic-update-slice", "custom-call", "rng-bit-generator")
# Index operands of these start at this position; constant indices are static slicing, others are data-dependent.
_DYNAMIC_INDEX_FROM = {"dynamic-slice": 1, "dynamic-update-slice": 2}


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path)


def _origin(attributes: str) -> str:
    """``aten op @ file:line`` from the HLO metadata (XLA_HLO_DEBUG=1); autograd nodes have no Python frame."""
    op_type = _OP_TYPE.search(attributes)
    src = _SOURCE.search(attributes)
    where = f"{_short_path(src.group(1))}:{src.group(2)}" if src else "backward (no Python frame)"
    return f"{op_type.group(1) if op_type else '?'} @ {where}"


def hlo_census(hlo: str) -> dict:
    """Opcode counts, result element types, dynamic shapes, and where the ``TRACED_OPCODES`` come from."""
    opcodes, types, sources = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    constants = {m.group(1) for m in re.finditer(r"%(\S+) = \S+ constant\(", hlo)}
    dynamic_shapes, dynamic_indices = [], []
    for match in _INSTRUCTION.finditer(hlo):
        shape, opcode, rest = match.groups()
        opcodes[opcode] += 1
        types.update(set(_ELEMENT_TYPE.findall(shape)))
        if _DYNAMIC_DIM.search(shape):
            dynamic_shapes.append(match.group(0).strip()[:200])
        if opcode in TRACED_OPCODES:
            sources[opcode][_origin(rest)] += 1
        if opcode in _DYNAMIC_INDEX_FROM:
            operands = re.findall(r"%(\S+?)[,)]", rest.split("), ", 1)[0] + ")")
            if not set(operands[_DYNAMIC_INDEX_FROM[opcode] :]) <= constants:
                dynamic_indices.append(f"{opcode} from {_origin(rest)}")
    return {
        "instructions": sum(opcodes.values()),
        "opcodes": dict(opcodes.most_common()),
        "result_types": dict(types.most_common()),
        "dynamic_shapes": dynamic_shapes,
        "data_dependent_slices": dynamic_indices,
        "sources": {op: dict(c.most_common()) for op, c in sorted(sources.items())},
    }


def census_violations(census: dict) -> list[str]:
    """Forbidden opcodes and dynamic shapes, as readable lines (empty when the graph is clean)."""
    found = [
        f"{op} x{census['opcodes'][op]}: {why}" for op, why in FORBIDDEN_OPCODES.items() if op in census["opcodes"]
    ]
    return found + [f"dynamic shape: {line}" for line in census["dynamic_shapes"]]


def origins(census: dict, *opcodes: str) -> set[str]:
    """``aten op @ file`` (no line number) of every instruction with one of ``opcodes``."""
    return {where.rsplit(":", 1)[0] for op in opcodes for where in census["sources"].get(op, {})}
