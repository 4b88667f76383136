"""Eidetic selection, chunked form: innovation-based top-k per chunk and the memory each chunk sees, with static
shapes.

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

import torch
import torch.nn.functional as F

from .common import INVALID_SCORE, EideticMemory, empty_slots
from .recurrent import merge_slots


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


def memory_per_chunk(candidates: EideticMemory, capacity: int) -> tuple[EideticMemory, EideticMemory]:
    """Run the memory over the chunks.

    Args:
        candidates: picks of every chunk, ``k, v [B, nC, k, F]``, ``pos, score [B, nC, k]``.

    Returns:
        ``(seen, final)``: ``seen`` has ``[B, nC, M, ...]`` fields, the memory as chunk ``c`` sees it (picks of
        chunks ``< c``); ``final`` (``[B, M, ...]``) also holds the last chunk's picks.
    """
    bsz, _, _, features = candidates.k.shape
    memory = empty_slots(bsz, capacity, features, device=candidates.k.device, dtype=candidates.k.dtype)
    seen = []
    # A recurrence over chunks (trip count fixed by the shape), over unbind(1) views: indexing ``field[:, c]``
    # would make each step's backward materialise a zero tensor of the whole input (quadratic in L).
    # A None field (EideticMemory.bias) is absent: it stays None.
    for chunk_picks in zip(*(field.unbind(1) for field in candidates if field is not None)):
        seen.append(memory)
        memory = merge_slots(memory, EideticMemory(*chunk_picks), capacity)
    stacked = EideticMemory(*(None if fields[0] is None else torch.stack(fields, dim=1) for fields in zip(*seen)))
    return stacked, memory


def select_per_chunk(
    scores: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, selections: int, capacity: int
) -> tuple[EideticMemory, EideticMemory]:
    """The whole policy over a sequence: ``scores [B, L]`` (``INVALID_SCORE`` at padding), ``k, v [B, L, F]``.

    Returns ``(picks, seen)``: ``picks`` (``[B, nC, selections, ...]``) are every chunk's selections, ``seen``
    (``[B, nC, capacity, ...]``) the memory as chunk ``c`` sees it (picks of chunks ``< c``). The reference
    ``naive.select_per_chunk_ref`` has the same signature and result.
    """
    onehot, pick_score, pick_pos = topk_per_chunk(scores, chunk_size, selections)
    picks = EideticMemory(take_selected(onehot, k), take_selected(onehot, v), pick_pos, pick_score)
    seen, _ = memory_per_chunk(picks, capacity)
    return picks, seen
