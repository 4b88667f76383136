"""Fixed-shape inference graphs of a B'MOJO model, for ``torch_neuronx.trace`` (and ``torch.jit.trace`` on CPU).

A traced graph takes and returns flat tuples of tensors; ``BMojoCache`` holds a list of per-layer dicts. This
module fixes one order for the cache's tensors (the *state spec*) and wraps the model in two modules:

* ``PrefillGraph``: ``input_ids [B, P]`` -> ``(logits [B, V] of the last position, positions [B], *state)``;
* ``DecodeGraph``:  ``(token [B], positions [B], *state)`` -> ``(logits [B, V], positions [B], *state)``.

The decode graph clones its state inputs before the model updates them in place, so the graph is a pure
function: inputs are never written, the new state comes back as outputs (a compiled Neuron graph must not
mutate its inputs, and a TorchScript trace that did would change the caller's tensors).

``NeuronBMojoGenerator`` runs exported graphs (Neuron or CPU-traced) for greedy decoding of prompts of any length:
the first ``P`` prompt tokens go through the prefill graph, the rest one at a time through the decode graph;
prompts shorter than ``P`` start from the empty state and use the decode graph only.

Only torch and bmojo are imported here (no Neuron packages), so everything in this file runs on a CPU.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from bmojo.modeling_bmojo import BMojoCache, BMojoForCausalLM

MANIFEST = "manifest.json"
PREFILL_FILE = "prefill.pt"
DECODE_FILE = "decode.pt"
INITIAL_STATE_FILE = "initial_state.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StateEntry:
    """One tensor of the flattened cache: ``layers[layer].tensors()[name]``."""

    layer: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def key(self) -> str:
        return f"layers.{self.layer}.{self.name}"


def state_spec(config, batch_size: int, dtype: torch.dtype = torch.float32) -> list[StateEntry]:
    """The order (and shapes, dtypes) of the flattened cache: layer by layer, each layer's tensors in the
    order of its typed state's fields (``layer.tensors()``). The order depends only on the configuration."""
    empty = BMojoCache.empty(config, batch_size, device="meta", dtype=dtype)
    return [
        StateEntry(i, name, tuple(t.shape), t.dtype)
        for i, layer in enumerate(empty.layers)
        for name, t in layer.tensors().items()
    ]


def flatten_cache(cache: BMojoCache, spec: list[StateEntry]) -> tuple[torch.Tensor, ...]:
    """The cache's state tensors in ``spec`` order (``positions`` is not included)."""
    named = [layer.tensors() for layer in cache.layers]
    names = [set(layer) for layer in named]
    expected = [set() for _ in range(1 + max((entry.layer for entry in spec), default=-1))]
    for entry in spec:
        expected[entry.layer].add(entry.name)
    if names != expected:
        raise ValueError(f"the cache's tensors {names} do not match the state spec {expected}")
    # While tracing, torch.jit records sizes as tensors; the shapes are checked by the eager runs instead.
    check = not torch.jit.is_tracing()
    flat = []
    for entry in spec:
        t = named[entry.layer][entry.name]
        if check and (tuple(t.shape) != entry.shape or t.dtype != entry.dtype):
            raise ValueError(
                f"{entry.key}: the cache holds {tuple(t.shape)} {t.dtype}, "
                f"the state spec says {entry.shape} {entry.dtype}"
            )
        flat.append(t)
    return tuple(flat)


def unflatten_cache(config, spec: list[StateEntry], positions: torch.Tensor, tensors) -> BMojoCache:
    """The inverse of ``flatten_cache`` (the tensors are used as they are, not copied)."""
    tensors = tuple(tensors)
    if len(tensors) != len(spec):
        raise ValueError(f"expected {len(spec)} state tensors, got {len(tensors)}")
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
    for entry, t in zip(spec, tensors):
        layers[entry.layer][entry.name] = t
    return BMojoCache.from_tensors(config, layers, positions)


class PrefillGraph(nn.Module):
    """``input_ids [B, P]`` (no padding) -> ``(logits [B, V] at the last position, positions [B], *state)``."""

    def __init__(self, model: BMojoForCausalLM, spec: list[StateEntry]):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, use_cache=True, logits_to_keep=1)
        cache = out.cache
        return (out.logits[:, -1], cache.positions) + flatten_cache(cache, self.spec)


class DecodeGraph(nn.Module):
    """``(token [B], positions [B], *state)`` -> ``(logits [B, V], positions + 1, *new state)``; inputs untouched."""

    def __init__(self, model: BMojoForCausalLM, spec: list[StateEntry]):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, token: torch.Tensor, positions: torch.Tensor, *state: torch.Tensor):
        # The model updates the state in place (copy_): work on copies so the graph's inputs stay read-only.
        cache = unflatten_cache(self.model.config, self.spec, positions, (t.clone() for t in state))
        hidden = self.model.model.step(token, cache)
        logits = self.model.lm_head(hidden)
        return (logits, cache.positions) + flatten_cache(cache, self.spec)


def example_inputs(config, spec: list[StateEntry], batch_size: int, prompt_length: int, dtype: torch.dtype):
    """Inputs of the right shapes for tracing: ``(prefill_inputs, decode_inputs)``.

    The decode example is the empty state at position 0: tracing only needs shapes and dtypes, and every code
    path of a decode step is tensor arithmetic (no Python branch on values), so any state traces the same graph.
    """
    ids = torch.randint(0, config.vocab_size, (batch_size, prompt_length), dtype=torch.long)
    empty = BMojoCache.empty(config, batch_size, dtype=dtype)
    decode = (torch.zeros(batch_size, dtype=torch.long), empty.positions) + flatten_cache(empty, spec)
    return (ids,), decode


def manifest(config, spec, batch_size: int, prompt_length: int, dtype: torch.dtype, compiler: dict) -> dict:
    """What a program needs to call the exported graphs: files, input/output order, shapes and dtypes."""

    def entry(name, shape, dt):
        return {"name": name, "shape": list(shape), "dtype": str(dt).replace("torch.", "")}

    state = [entry(e.key, e.shape, e.dtype) for e in spec]
    logits = entry("logits", (batch_size, config.vocab_size), dtype)
    positions = entry("positions", (batch_size,), torch.long)
    return {
        "format_version": FORMAT_VERSION,
        "model_type": "bmojo",
        "batch_size": batch_size,
        "prompt_length": prompt_length,
        "dtype": str(dtype).replace("torch.", ""),
        "layers_block_type": list(config.layers_block_type),
        "compiler": compiler,
        "files": {"prefill": PREFILL_FILE, "decode": DECODE_FILE, "initial_state": INITIAL_STATE_FILE},
        "prefill": {
            "inputs": [entry("input_ids", (batch_size, prompt_length), torch.long)],
            "outputs": [logits, positions] + state,
        },
        "decode": {
            "inputs": [entry("token", (batch_size,), torch.long), positions] + state,
            "outputs": [logits, positions] + state,
        },
        "notes": [
            "prefill takes exactly prompt_length tokens per row, no padding; feed longer prompts' remaining tokens "
            "through decode, and start prompts shorter than prompt_length from initial_state with decode only",
            "decode's state outputs are its next call's state inputs, in the same order",
        ],
    }


def initial_state(config, spec: list[StateEntry], batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The empty decoding state (position 0) as named tensors, saved next to the graphs."""
    empty = BMojoCache.empty(config, batch_size, dtype=dtype)
    tensors = {e.key: t.contiguous() for e, t in zip(spec, flatten_cache(empty, spec))}
    tensors["positions"] = empty.positions
    return tensors


class NeuronBMojoGenerator:
    """Greedy decoding with exported graphs: ``prefill(input_ids) -> outputs``, ``decode(token, positions, *state)``.

    Works with the torch_neuronx graphs on a trn1 instance and with CPU ``torch.jit.trace`` graphs alike."""

    def __init__(self, prefill, decode, manifest: dict, initial: dict[str, torch.Tensor]):
        self.prefill = prefill
        self.decode = decode
        self.manifest = manifest
        self.batch_size = manifest["batch_size"]
        self.prompt_length = manifest["prompt_length"]
        self.state_names = [e["name"] for e in manifest["decode"]["inputs"][2:]]
        self.initial = initial

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronBMojoGenerator":
        from safetensors.torch import load_file

        directory = Path(directory)
        info = json.loads((directory / MANIFEST).read_text())
        files = info["files"]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch >= 2.10 deprecates torch.jit
            prefill = torch.jit.load(str(directory / files["prefill"]))
            decode = torch.jit.load(str(directory / files["decode"]))
        return cls(prefill, decode, info, load_file(str(directory / files["initial_state"])))

    def start(self, prompt: torch.Tensor):
        """Consume ``prompt [B, n]`` (n >= 1); returns ``(logits [B, V] after the last prompt token, state)``."""
        if prompt.dim() != 2 or prompt.shape[0] != self.batch_size or prompt.shape[1] < 1:
            raise ValueError(f"prompt must have shape [{self.batch_size}, n >= 1], got {tuple(prompt.shape)}")
        prompt = prompt.to(torch.long)
        if prompt.shape[1] >= self.prompt_length:
            logits, positions, *state = self.prefill(prompt[:, : self.prompt_length].contiguous())
            rest = prompt[:, self.prompt_length :]
        else:
            positions = self.initial["positions"].clone()
            state = [self.initial[name].clone() for name in self.state_names]
            logits, rest = None, prompt
        for t in range(rest.shape[1]):
            logits, positions, *state = self.decode(rest[:, t].contiguous(), positions, *state)
        return logits, (positions, state)

    def step(self, token: torch.Tensor, state):
        positions, tensors = state
        logits, positions, *tensors = self.decode(token.to(torch.long).contiguous(), positions, *tensors)
        return logits, (positions, tensors)

    def greedy(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """``prompt`` followed by ``max_new_tokens`` greedily chosen tokens: ``[B, n + max_new_tokens]``."""
        logits, state = self.start(prompt)
        out = [prompt.to(torch.long)]
        for i in range(max_new_tokens):
            token = logits.argmax(-1)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:
                logits, state = self.step(token, state)
        return torch.cat(out, dim=1)
