"""The decoding cache: every layer's fixed-size state, and the keyword that carries it through ``generate()``."""

from __future__ import annotations

import torch
from transformers.generation import utils as _generation_utils

from .configuration_bmojo import BMojoConfig
from .layers import MIXERS, InferenceState

# The keyword under which `generate()` carries a model's cache between steps. transformers 5.2x renamed every cache
# keyword to ``cache`` (``cache_params`` and ``past_key_values`` became deprecated aliases, and model outputs answer
# ``.cache_params`` from a field called ``cache``); 4.5x, the trn1 line, reorders only ``past_key_values`` in beam
# search. Read from the installed transformers so that both lines decode from the fixed-size cache.
CACHE_KWARG = "cache" if "cache" in getattr(_generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
CACHE_ALIASES = ("cache", "cache_params", "past_key_values")


def pop_cache_argument(cache, kwargs: dict):
    """The cache given under any of its names (``cache``, ``cache_params``, ``past_key_values``); one at most."""
    given = {"cache": cache} if cache is not None else {}
    for name in CACHE_ALIASES[1:]:
        value = kwargs.pop(name, None)
        if value is not None:
            given[name] = value
    if len(given) > 1:
        raise ValueError(f"give the decoding cache once, as `cache`; got {' and '.join(sorted(given))}")
    value = next(iter(given.values()), None)
    if value is not None and not isinstance(value, BMojoCache):
        got = type(value).__name__
        raise TypeError(f"the cache must be a BMojoCache (from a forward with use_cache=True), got {got}")
    return value


class BMojoCache:
    """Fixed-size decoding state of every layer; its size never depends on how many tokens were seen.

    ``layers[i]`` is the typed state of layer ``i``'s mixer, defined next to the code that updates it:
    ``SSMState`` (``layers/ssm.py``: ``conv``, ``ssm``), ``AttentionState`` (``layers/attention.py``: the ring
    ``ring_k, ring_v, ring_pos``) or ``BMojoState`` (``layers/bmojo.py``: its SSM's, its ring's with the fading
    keys ``ring_kf, ring_vf``, and ``EideticState`` from ``layers/eidetic.py``: ``mem_*``, ``run_*``, ``prev_f``).
    ``layer.tensors()`` names every tensor by those flat names.

    ``positions [B]`` is the position of the next token of each row; ``doc_start [B]`` (long, with
    ``memory_reset_at_document``, else ``None``) the first position of that token's document. States are updated
    in place.
    """

    # transformers' generate() asks this before compiling the decoding step; ours is compiled by XLA, not there.
    is_compileable = False

    def __init__(
        self, config: BMojoConfig, layers: list[InferenceState], positions: torch.Tensor, doc_start=None
    ):
        self.config = config
        self.layers = layers
        self.positions = positions
        self.doc_start = doc_start

    @classmethod
    def empty(cls, config: BMojoConfig, batch_size: int, device=None, dtype=torch.float32) -> "BMojoCache":
        """A cache for decoding from position 0."""
        layers = [
            MIXERS[t].allocate_inference_state(config, batch_size, device, dtype) for t in config.layers_block_type
        ]
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(config, layers, zeros, zeros.clone() if config.memory_reset_at_document else None)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def is_linear(self) -> list[bool]:
        """Every layer's state is a fixed-size recurrence (transformers 5.2x: a cache it must not slice by length)."""
        return [True] * len(self.layers)

    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        tensors = [t for layer in self.layers for t in layer.tensors().values()] + [self.positions]
        tensors += [] if self.doc_start is None else [self.doc_start]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reorder_cache(self, beam_idx: torch.Tensor) -> "BMojoCache":
        """Select rows (beam search)."""
        for layer in self.layers:
            layer.map_(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        if self.doc_start is not None:
            self.doc_start = self.doc_start.index_select(0, beam_idx.to(self.doc_start.device))
        return self

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.positions.max()) if self.positions.numel() else 0

    @classmethod
    def from_tensors(
        cls, config: BMojoConfig, layers: list[dict[str, torch.Tensor]], positions, doc_start=None
    ) -> "BMojoCache":
        """A cache holding the given tensors (used as they are), each layer's named as by ``layer.tensors()``."""
        states = [MIXERS[t].state_type.from_tensors(named) for t, named in zip(config.layers_block_type, layers)]
        return cls(config, states, positions, doc_start)
