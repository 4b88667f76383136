"""Eidetic memory: innovation-based top-k selection per chunk and a fixed-size memory, with static shapes.

Retention policy (the same in the parallel forward, in decoding and in the reference):

1. In each chunk of ``C`` tokens the ``k_sel`` tokens with the highest innovation score are selected
   (ties: the earlier position wins). Padding has score ``-1``; real scores are ``>= 0``.
2. When a chunk ends, its selections are merged into the memory of ``M`` slots, which keeps the ``M`` highest
   scores of (memory + selections), again with the earlier position winning ties. So a token selected in chunk
   ``c`` is in the memory from chunk ``c+1`` on, and stays until ``M`` more surprising tokens have been seen.
3. A memory slot is visible to query ``i`` only once its token has left the in-context window
   (``pos <= i - W``); the attention applies that mask.

No sort, no ``nonzero``, no variable-length gather: top-k is ``k`` rounds of ``argmax``, taking the selected
rows is a one-hot matmul (so gradients reach the selected keys and values), and the merge ranks entries by
pairwise comparison and moves them with a one-hot matmul.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

INVALID_SCORE = -1.0  # innovation scores are squared errors (>= 0); -1 marks an empty slot or padding


class Slots(NamedTuple):
    """A fixed-size set of remembered tokens: ``k, v [..., S, F]``, ``pos [..., S]`` (long), ``score [..., S]``."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    score: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.score >= 0


def empty_slots(batch: int, size: int, features: int, *, device=None, dtype=torch.float32) -> Slots:
    """``size`` empty slots per row."""
    zeros = torch.zeros(batch, size, features, device=device, dtype=dtype)
    return Slots(
        zeros,
        zeros.clone(),
        torch.zeros(batch, size, dtype=torch.long, device=device),
        torch.full((batch, size), INVALID_SCORE, device=device, dtype=torch.float32),
    )


def topk_per_chunk(scores: torch.Tensor, chunk_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` scores in every chunk.

    Args:
        scores: ``[B, L]`` (``-1`` at padding); ``L`` is padded up to a multiple of ``chunk_size``.

    Returns:
        ``onehot [B, nC, k, C]`` (float32, row ``r`` marks the ``r``-th pick of chunk ``c``),
        ``score [B, nC, k]`` and ``pos [B, nC, k]`` (absolute positions) of the picks.
    """
    bsz, length = scores.shape
    num_chunks = -(-length // chunk_size)
    work = F.pad(scores.float(), [0, num_chunks * chunk_size - length], value=INVALID_SCORE)
    work = work.view(bsz, num_chunks, chunk_size)
    lane = torch.arange(chunk_size, device=scores.device)
    picks, values, hots = [], [], []
    for _ in range(k):  # k is a small constant: k rounds of argmax instead of a sort
        idx = work.argmax(dim=-1)  # the first maximum: earlier positions win ties
        hot = lane == idx[..., None]
        values.append(work.amax(dim=-1))  # the picked value, without a data-indexed gather
        picks.append(idx)
        hots.append(hot)
        # Exclude the pick; -2 keeps it below padding so exhausted chunks pick padding, never a repeat.
        work = work.masked_fill(hot, 2 * INVALID_SCORE)
    onehot = torch.stack(hots, dim=2).float()
    score = torch.stack(values, dim=2).clamp_min(INVALID_SCORE)
    start = torch.arange(num_chunks, device=scores.device)[:, None] * chunk_size
    pos = torch.stack(picks, dim=2) + start
    return onehot, score, pos


def take_selected(onehot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows picked by ``onehot [B, nC, k, C]`` from ``x [B, L, F]`` -> ``[B, nC, k, F]`` (a matmul, not a gather)."""
    bsz, num_chunks, _, chunk = onehot.shape
    x = F.pad(x, [0, 0, 0, num_chunks * chunk - x.shape[1]]).view(bsz, num_chunks, chunk, -1)
    return torch.einsum("bnkc,bncf->bnkf", onehot.to(x.dtype), x)


def merge_slots(a: Slots, b: Slots, capacity: int) -> Slots:
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
    return Slots(
        torch.einsum("bsn,bnf->bsf", move, k),
        torch.einsum("bsn,bnf->bsf", move, v),
        torch.where(place, pos[:, None, :], 0).sum(-1),
        torch.where(place, score[:, None, :], 0).sum(-1),
    )


def memory_per_chunk(candidates: Slots, capacity: int) -> tuple[Slots, Slots]:
    """Run the memory over the chunks.

    Args:
        candidates: picks of every chunk, ``k, v [B, nC, k, F]``, ``pos, score [B, nC, k]``.

    Returns:
        ``(seen, final)``: ``seen`` has ``[B, nC, M, ...]`` fields, the memory as chunk ``c`` sees it (picks of
        chunks ``< c``); ``final`` (``[B, M, ...]``) also holds the last chunk's picks.
    """
    bsz, num_chunks, _, features = candidates.k.shape
    memory = empty_slots(bsz, capacity, features, device=candidates.k.device, dtype=candidates.k.dtype)
    seen = []
    for c in range(num_chunks):  # a recurrence over chunks: trip count fixed by the shape
        seen.append(memory)
        memory = merge_slots(memory, Slots(*(field[:, c] for field in candidates)), capacity)
    stacked = Slots(*(torch.stack(fields, dim=1) for fields in zip(*seen)))
    return stacked, memory


def eidetic_mask_ref(scores: torch.Tensor, chunk_size: int, k: int, capacity: int, window: int) -> torch.Tensor:
    """Plain-loop reference of the policy: ``[B, L, L]`` bool, ``True`` where query ``i`` sees token ``j`` through
    the eidetic memory. Uses Python sorting; for tests only."""
    bsz, length = scores.shape
    mask = torch.zeros(bsz, length, length, dtype=torch.bool)
    for b in range(bsz):
        s = scores[b].tolist()
        memory: list[int] = []  # positions
        for start in range(0, length, chunk_size):
            for i in range(start, min(start + chunk_size, length)):
                for j in memory:
                    if j <= i - window:
                        mask[b, i, j] = True
            chunk = [j for j in range(start, min(start + chunk_size, length)) if s[j] >= 0]
            picks = sorted(chunk, key=lambda j: (-s[j], j))[:k]
            memory = sorted(memory + picks, key=lambda j: (-s[j], j))[:capacity]
    return mask
