"""What every mixer shares: the call shape (``SequenceInfo`` in, ``MixerOutput`` out), rotary angles, and the base
of the typed decoding states.

Every mixer (``Mamba2Mixer``, ``SlidingWindowAttention``, ``BMojoMixer``) has

* ``forward(h [B, L, d], info: SequenceInfo) -> MixerOutput(out [B, L, d], aux_loss or None, state or None)``;
* ``step(h [B, d], state, positions [B, 1], rope: Rope, doc_start=None, token_ids=None) -> out [B, d]``, updating
  ``state`` in place (``doc_start [B]`` and ``token_ids [B]``: the token's, where some layer needs them);
* ``allocate_inference_state(config, batch_size, device, dtype)``: the empty state its ``step`` updates,

so that ``BMojoBlock`` runs any of them without asking which it holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch


class Rope(NamedTuple):
    """Rotary angles: ``cos, sin [B or 1, L, D/2]`` at the tokens' positions; ``eid_cos, eid_sin [1, 1, D/2]``: the
    fixed rotation of eidetic scores (every eidetic key is scored as if it sat ``2W`` before the query)."""

    cos: torch.Tensor
    sin: torch.Tensor
    eid_cos: torch.Tensor
    eid_sin: torch.Tensor


@dataclass
class SequenceInfo:
    """What every mixer needs to know about the (rolled, right-padded) batch in a parallel forward."""

    positions: torch.Tensor  # [1, L] long: the same shape as a decoding step's [B, 1]
    rope: Rope
    valid: torch.Tensor | None  # [B, L] bool, None when nothing is padded
    lengths: torch.Tensor | None  # [B] long; set when the decoding state must be collected
    collect_state: bool
    # [B, L] long: first position of each token's document (memory_reset_at_document), else None
    doc_start: torch.Tensor | None = None
    # [B, L] long: the (rolled) token ids, for selection_score="random" (the score hashes them), else None
    token_ids: torch.Tensor | None = None


class MixerOutput(NamedTuple):
    out: torch.Tensor  # [B, L, d]
    aux_loss: torch.Tensor | None  # a scalar to add to the training loss (the innovation loss), or None
    state: "InferenceState | None"  # the decoding state after each row's last token (info.collect_state)


class InferenceState:
    """Base of the typed decoding states: dataclasses whose fields are tensors, nested states, or ``None`` (a part
    the layer does not have). States are updated in place while decoding; their size never depends on how many
    tokens were seen.

    ``tensors()`` names every tensor by a flat name (``conv``, ``ring_k``, ``mem_pos``, ...) for export and
    accounting; nested states declare their type in the field's metadata (``state_field``).
    """

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by its flat name, in declaration order."""
        out: dict[str, torch.Tensor] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, InferenceState):
                out.update(value.tensors())
            elif value is not None:
                out[f.name] = value
        return out

    def map_(self, fn) -> None:
        """Replace every tensor ``t`` by ``fn(t)`` (e.g. select rows for beam search)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, InferenceState):
                value.map_(fn)
            elif value is not None:
                setattr(self, f.name, fn(value))

    @classmethod
    def names(cls) -> list[str]:
        """Every flat name this state type can hold."""
        out = []
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("state")
            out.extend(sub.names() if sub is not None else [f.name])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]):
        """The inverse of ``tensors()`` (tensors used as they are); a nested part with no tensor is ``None``."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("state")
            if sub is None:
                kwargs[f.name] = tensors.get(f.name)
            else:
                kwargs[f.name] = sub.from_tensors(tensors) if any(n in tensors for n in sub.names()) else None
        return cls(**kwargs)


def state_field(state_type: type[InferenceState]):
    """A dataclass field holding a nested state of ``state_type`` (or ``None``)."""
    return dataclasses.field(default=None, metadata={"state": state_type})


def where_rows(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row select: ``cond [B, 1]`` bool chooses between ``a`` and ``b`` (``[B, ...]``)."""
    return torch.where(cond.view(-1, *([1] * (a.dim() - 1))), a, b)
