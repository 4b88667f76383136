"""The eidetic memory's type and constants, shared by the reference, chunked and recurrent selection forms."""

from __future__ import annotations

from typing import NamedTuple

import torch

INVALID_SCORE = -1.0  # innovation scores are squared errors (>= 0); -1 marks an empty slot or padding


class EideticMemory(NamedTuple):
    """A fixed-size set of remembered tokens (the eidetic memory, or a chunk's picks): ``k, v [..., S, F]``
    (``F`` features, or ``Hkv, D`` heads for the attention ops), ``pos [..., S]`` (long), ``score [..., S]``
    (float32; ``INVALID_SCORE`` marks an empty slot), ``bias [..., S]`` (float32) or ``None``: added to each slot's
    eidetic logit. The memory argument of every attention form."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    score: torch.Tensor
    bias: torch.Tensor | None = None  # [..., S] float32 logit bias per slot (learned_selection), or None

    @property
    def valid(self) -> torch.Tensor:
        return self.score >= 0


def empty_slots(batch: int, size: int, features: int, *, device=None, dtype=torch.float32) -> EideticMemory:
    """``size`` empty slots per row."""
    zeros = torch.zeros(batch, size, features, device=device, dtype=dtype)
    return EideticMemory(
        zeros,
        zeros.clone(),
        torch.zeros(batch, size, dtype=torch.long, device=device),
        torch.full((batch, size), INVALID_SCORE, device=device, dtype=torch.float32),
    )



Slots = EideticMemory  # the name the selection ops and their tests use
