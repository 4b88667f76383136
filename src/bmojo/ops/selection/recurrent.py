"""Retention of the eidetic memory, one update at a time: keep the best ``capacity`` of two slot sets.

Used by decoding (a token joins its chunk's picks; a finished chunk's picks join the memory) and, once per chunk,
by the chunked form (``chunk.memory_per_chunk``). Ranking is by pairwise comparison and entries move by a
fixed-shape ``torch.gather`` (the index of the entry of rank ``s`` is a masked sum): no sort, static shapes. A
gather reads only the entries it moves, so a non-finite key or value in an entry that is not kept cannot reach the
kept ones (a one-hot matmul would spread it: ``0 * inf = nan``); empty slots hold zeros.
"""

from __future__ import annotations

import torch

from .common import EideticMemory


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, n, ...]`` rows ``index [B, S]`` (long) -> ``[B, S, ...]``: a fixed-shape gather along dim 1, whose
    gradient reaches exactly the gathered rows."""
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def merge_slots(a: EideticMemory, b: EideticMemory, capacity: int) -> EideticMemory:
    """Keep the ``capacity`` best entries of ``a`` and ``b`` (``[B, S_a, ...]``, ``[B, S_b, ...]``).

    Order: higher score first, then earlier position, then earlier entry; slots come out in that order. Slots that
    end up empty (score ``< 0``) hold zero keys, values and bias. ``bias`` is carried when both hold one.
    Requires ``S_a + S_b >= capacity``.
    """
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
    index = torch.where(place, entry, 0).sum(-1)  # [B, capacity]: the entry of rank s (exactly one per slot)
    kept_score = gather_rows(score, index)
    kept = kept_score >= 0

    def move(x, y):
        rows = gather_rows(torch.cat([x, y], dim=1), index)
        return torch.where(kept.view(*kept.shape, *([1] * (rows.dim() - 2))), rows, torch.zeros_like(rows))

    bias = None if a.bias is None or b.bias is None else move(a.bias, b.bias)
    return EideticMemory(move(a.k, b.k), move(a.v, b.v), gather_rows(pos, index), kept_score, bias)
