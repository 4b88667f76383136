"""Retention of the eidetic memory, one update at a time: keep the best ``capacity`` of two slot sets.

Used by decoding (a token joins its chunk's picks; a finished chunk's picks join the memory) and, once per chunk,
by the chunked form (``chunk.memory_per_chunk``). Ranking is by pairwise comparison and entries move by a one-hot
matmul: no sort, static shapes.
"""

from __future__ import annotations

import torch

from .common import EideticMemory


def merge_slots(a: EideticMemory, b: EideticMemory, capacity: int) -> EideticMemory:
    """Keep the ``capacity`` best entries of ``a`` and ``b`` (``[B, S_a, ...]``, ``[B, S_b, ...]``).

    Order: higher score first, then earlier position, then earlier entry; slots come out in that order.
    Requires ``S_a + S_b >= capacity``.
    """
    k = torch.cat([a.k, b.k], dim=1)
    v = torch.cat([a.v, b.v], dim=1)
    pos = torch.cat([a.pos, b.pos], dim=1)
    score = torch.cat([a.score, b.score], dim=1)
    n = score.shape[1]
    entry = torch.arange(n, device=score.device)
    s_i, s_j = score[:, :, None], score[:, None, :]
    p_i, p_j = pos[:, :, None], pos[:, None, :]
    # beats[b, i, j]: entry j ranks before entry i
    beats = (s_j > s_i) | ((s_j == s_i) & ((p_j < p_i) | ((p_j == p_i) & (entry[None, :] < entry[:, None]))))
    rank = beats.sum(dim=-1)  # [B, n], a permutation of 0..n-1
    place = rank[:, None, :] == torch.arange(capacity, device=score.device)[None, :, None]  # [B, capacity, n]
    move = place.to(k.dtype)
    return EideticMemory(
        torch.einsum("bsn,bnf->bsf", move, k),
        torch.einsum("bsn,bnf->bsf", move, v),
        torch.where(place, pos[:, None, :], 0).sum(-1),
        torch.where(place, score[:, None, :], 0).sum(-1),
    )
