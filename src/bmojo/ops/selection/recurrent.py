"""Retention of the eidetic memory, one update at a time: keep the best ``capacity`` of two slot sets.

Used by decoding (a token joins its chunk's picks; a finished chunk's picks join the memory) and, once per chunk,
by the chunked form's scan (``chunk.memory_per_chunk_scan``). Ranking is by pairwise comparison and entries move by
a fixed-shape ``torch.gather`` (the index of the entry of rank ``s`` is a masked sum): no sort, static shapes. A
gather reads only the entries it moves, so a non-finite key or value in an entry that is not kept cannot reach the
kept ones (a one-hot matmul would spread it: ``0 * inf = nan``); empty slots hold zeros.

Score decay (``memory_score_decay = d < 1``): at every chunk boundary each memory slot's score is multiplied by
``d``, so at chunk ``c`` a token picked in chunk ``c_p`` competes with ``s * d^(c - c_p)``. Comparing two such
values does not depend on ``c``: ranking by ``log s - c_p log d`` (``retention_key``) is the same order at every
boundary, and it is what every form (scan, closed form, decoding) compares, so they agree exactly. Slots keep the
token's own (undecayed) score.
"""

from __future__ import annotations

import math

import torch

from .common import INVALID_SCORE, EideticMemory


def retention_key(score: torch.Tensor, pos: torch.Tensor, chunk_size: int | None, decay: float) -> torch.Tensor:
    """What retention ranks entries by (higher first), ``score, pos [...]`` -> ``[...]``.

    ``decay == 1``: the score itself. ``decay < 1``: ``log(score) - (pos // chunk_size) * log(decay)`` in the
    score's dtype (the order of ``score * decay^(c - pos // chunk_size)`` at any chunk ``c``); a zero score ranks
    below every positive one and above empty slots (``score < 0``), as ``0 * decay^n`` would. float32 keys resolve
    relative score differences down to about ``1e-7 * (1 + |chunk * log(decay)|)``.
    """
    if decay == 1.0:
        return score
    if chunk_size is None:
        raise ValueError("chunk_size is needed to age the scores (memory_score_decay < 1)")
    born = torch.div(pos, chunk_size, rounding_mode="floor").to(score.dtype)
    age_bonus = born * torch.tensor(-math.log(decay), dtype=score.dtype, device=score.device)
    positive = torch.log(torch.where(score > 0, score, torch.ones_like(score))) + age_bonus
    lowest = torch.tensor(torch.finfo(score.dtype).min, dtype=score.dtype, device=score.device)
    floor = torch.where(score == 0, lowest, torch.tensor(-math.inf, dtype=score.dtype, device=score.device))
    return torch.where(score > 0, positive, floor)


def merge_slots(
    a: EideticMemory,
    b: EideticMemory,
    capacity: int,
    *,
    chunk_size: int | None = None,
    decay: float = 1.0,
    doc_start: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> EideticMemory:
    """Keep the ``capacity`` best entries of ``a`` and ``b`` (``[B, S_a, ...]``, ``[B, S_b, ...]``).

    Order: higher ``retention_key`` first (the score itself unless ``decay < 1``; ``chunk_size`` ages scores by
    ``pos // chunk_size``), then earlier position, then earlier entry; slots come out in that order. With
    ``doc_start [B]`` (long), entries whose position lies before it are dropped first (become empty: the score is
    set to ``INVALID_SCORE``). Slots that end up empty (score ``< 0``) hold zero keys, values and bias. ``bias`` is
    carried when both hold one. Requires ``S_a + S_b >= capacity``.

    ``rows [B, 1]`` (bool, or ``None`` for all): merge only in these rows; every other row returns ``a`` exactly as
    it is (decoding merges at chunk boundaries only, in a static graph). Requires ``S_a == capacity``; raises
    ``ValueError`` otherwise.
    """
    if rows is not None and a.pos.shape[1] != capacity:
        raise ValueError(f"merge_slots(rows=...) keeps a in the other rows: a has {a.pos.shape[1]} slots, "
                         f"capacity is {capacity}")
    pos = torch.cat([a.pos, b.pos], dim=1)
    score = torch.cat([a.score, b.score], dim=1)
    if doc_start is not None:  # memory_reset_at_document: slots of finished documents leave at this merge
        dropped = pos < doc_start[:, None]
        score = score.masked_fill(dropped if rows is None else dropped & rows, INVALID_SCORE)
    n = score.shape[1]
    entry = torch.arange(n, device=score.device)
    slot = torch.arange(capacity, device=score.device)
    key = retention_key(score, pos, chunk_size, decay)
    s_i, s_j = key[:, :, None], key[:, None, :]
    p_i, p_j = pos[:, :, None], pos[:, None, :]
    # beats[b, i, j]: entry j ranks before entry i
    beats = (s_j > s_i) | ((s_j == s_i) & ((p_j < p_i) | ((p_j == p_i) & (entry[None, :] < entry[:, None]))))
    rank = beats.sum(dim=-1)  # [B, n], a permutation of 0..n-1
    place = rank[:, None, :] == slot[:, None]  # [B, capacity, n]
    index = torch.where(place, entry, 0).sum(-1)  # [B, capacity]: the entry of rank s (exactly one per slot)
    if rows is not None:  # elsewhere slot s keeps entry s, a's own
        index = torch.where(rows, index, slot)
    kept_score = torch.gather(score, 1, index)
    empty = kept_score < 0
    if rows is not None:
        empty = empty & rows

    def expanded(x):  # index and mask broadcast to the rows of x [B, n, ...]
        ones = [1] * (x.dim() - 2)
        return index.view(*index.shape, *ones).expand(-1, -1, *x.shape[2:]), empty.view(*empty.shape, *ones)

    # Keys and values share theirs: a decoding step is bound by its count of ops.
    at_k = expanded(a.k)
    at_v = at_k if a.v.shape == a.k.shape else expanded(a.v)

    def move(x, y, at=(index, empty)):  # the kept rows of cat(x, y); empty slots hold zeros
        idx, mask = at
        return torch.gather(torch.cat([x, y], dim=1), 1, idx).masked_fill(mask, 0)

    bias = None if a.bias is None or b.bias is None else move(a.bias, b.bias)
    return EideticMemory(move(a.k, b.k, at_k), move(a.v, b.v, at_v), torch.gather(pos, 1, index), kept_score, bias)
