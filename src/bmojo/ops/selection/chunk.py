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

Options (``BMojoConfig``; their v0 values are the policy above, and the default ``memory_admission`` is
``"window_exit"``): ``memory_score_decay`` multiplies every slot's
score by ``decay`` at each chunk boundary (older tokens must have scored higher to stay); ``memory_admission=
"window_exit"`` lets chunk ``c``'s picks join only at chunk ``c + 1 + W/C``, once the whole chunk has left the
window, so every slot is visible to every query of the chunks that see it; ``memory_reset_at_document`` drops, at
each boundary, the slots from before the document of the next chunk's first token (and query ``i`` sees no slot
before its own document's start, a mask in the attention).

No sort, no ``nonzero``, no variable-length gather: top-k is ``k`` rounds of ``argmax``, taking the selected
rows is a fixed-shape ``torch.gather`` (gradients reach the selected keys and values, and only those), and the
merge ranks entries by pairwise comparison and moves them with a fixed-shape gather (the closed-form memory
fetches its slots by indexing, with the same property). Gathers, unlike one-hot
matmuls, never read the rows they do not move: a non-finite key or value of a token that is not selected cannot
spread into the picks or the memory. Empty picks and slots (score ``< 0``) hold zeros.

``learned_selection``: the scores are then already ``score * exp(u)``; each pick carries its token's ``bias = u``
(``EideticMemory.bias``) into the memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import INVALID_SCORE, EideticMemory, empty_slots
from .recurrent import merge_slots, retention_key

# The closed form costs O(P^2 nC) for P picks, the scan O(nC) merges; on one CPU thread they cost the same at about
# P = 2048 (L = 32K at C = 32, k = 2: scripts/bench_memory_per_chunk.py). Beyond it the scan runs.
CLOSED_FORM_MAX_PICKS = 2048


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
    """Rows picked by ``onehot [B, nC, k, C]`` from ``x [B, L, F]`` -> ``[B, nC, k, F]``: a fixed-shape gather at
    each pick's lane (the ``argmax`` of its one-hot row), so unpicked rows are never read."""
    bsz, num_chunks, _, chunk = onehot.shape
    x = F.pad(x, [0, 0, 0, num_chunks * chunk - x.shape[1]]).view(bsz, num_chunks, chunk, -1)
    lane = onehot.argmax(dim=-1)  # [B, nC, k]
    return torch.gather(x, 2, lane[..., None].expand(-1, -1, -1, x.shape[-1]))


def chunk_fields(slots: EideticMemory) -> list[EideticMemory]:
    """``[B, nC, S, ...]`` slots -> one ``[B, S, ...]`` ``EideticMemory`` per chunk (``None`` fields stay ``None``).

    Views from ``unbind(1)``: indexing ``field[:, c]`` in a loop would make each step's backward materialise a zero
    tensor of the whole input (quadratic in L)."""
    parts = [None if f is None else f.unbind(1) for f in slots]
    count = len(parts[0])
    return [EideticMemory(*(None if p is None else p[c] for p in parts)) for c in range(count)]


def stack_chunks(memories: list[EideticMemory]) -> EideticMemory:
    """The inverse of ``chunk_fields``: ``[B, S, ...]`` per chunk -> ``[B, nC, S, ...]``."""
    return EideticMemory(*(None if f[0] is None else torch.stack(f, dim=1) for f in zip(*memories)))


def memory_per_chunk_scan(
    candidates: EideticMemory,
    capacity: int,
    *,
    chunk_size: int | None = None,
    decay: float = 1.0,
    delay: int = 0,
    chunk_doc_start: torch.Tensor | None = None,
) -> tuple[EideticMemory, EideticMemory]:
    """The memory over the chunks, one merge per chunk boundary (the recurrent form; ``memory_per_chunk``'s
    arguments and result)."""
    bsz, num_chunks, _, features = candidates.k.shape
    bias_dtype = None if candidates.bias is None else candidates.bias.dtype
    memory = empty_slots(
        bsz, capacity, features, device=candidates.k.device, dtype=candidates.k.dtype, bias_dtype=bias_dtype
    )
    picks = chunk_fields(candidates)
    starts = [None] * num_chunks if chunk_doc_start is None else chunk_doc_start.unbind(1)
    options = dict(chunk_size=chunk_size, decay=decay)
    seen = []
    # A recurrence over chunks (trip count fixed by the shape): chunk c - 1 - delay's picks join before chunk c.
    for c in range(num_chunks + 1):
        if c > delay:
            start = starts[min(c, num_chunks - 1)]  # (the last chunk's for the final memory)
            memory = merge_slots(memory, picks[c - 1 - delay], capacity, **options, doc_start=start)
        if c < num_chunks:
            seen.append(memory)
    return stack_chunks(seen), memory


def memory_per_chunk_closed(
    candidates: EideticMemory,
    capacity: int,
    *,
    chunk_size: int | None = None,
    decay: float = 1.0,
    delay: int = 0,
    chunk_doc_start: torch.Tensor | None = None,
) -> tuple[EideticMemory, EideticMemory]:
    """The memory over the chunks without a loop (``memory_per_chunk``'s arguments and result, the same memory as
    ``memory_per_chunk_scan``).

    Retention keeps the best ``M`` under an order that does not change over time (``retention_key``: also with
    decay), so an evicted pick never returns and the memory seen by chunk ``c`` is simply the best ``M`` of its
    *pool*: the picks of chunks ``<= c - 1 - delay``, from ``chunk_doc_start[c]`` on (all slots before a document's
    start leave at once, so dropping them merge by merge keeps the same set). With ``P = nC k`` picks: a pairwise
    ``beats [P, P]``; one matmul counts, for every pick and chunk, the pool entries that beat it (its rank); slot
    ``m`` of chunk ``c`` is the pool pick of rank ``m`` (its index placed by a scatter into distinct bins), its
    row fetched by indexing (gradients reach the selected rows; nothing from unselected rows mixes in).
    Cost ``O(P^2 nC)``: quadratic in ``L``, unlike the scan.
    """
    bsz, num_chunks, sel = candidates.pos.shape
    count = num_chunks * sel
    device = candidates.pos.device
    pos, score = candidates.pos.flatten(1), candidates.score.flatten(1)  # [B, P], chunk-major
    key = retention_key(score, pos, chunk_size, decay)
    # beats[b, p, q]: pick q ranks before pick p (higher key, then earlier position: strict among real picks)
    k_p, k_q = key[:, :, None], key[:, None, :]
    beats = (k_q > k_p) | ((k_q == k_p) & (pos[:, None, :] < pos[:, :, None]))
    # pool[b, q, c]: pick q competes for the memory seen by chunk c (c = nC: the memory after the last chunk)
    born = torch.arange(count, device=device) // sel
    chunk = torch.arange(num_chunks + 1, device=device)
    pool = (born[:, None] + 1 + delay <= chunk[None, :])[None] & (score >= 0)[:, :, None]  # [B, P, nC + 1]
    if chunk_doc_start is not None:
        starts = torch.cat([chunk_doc_start, chunk_doc_start[:, -1:]], dim=1)  # (the final memory: no new drop)
        pool = pool & (pos[:, :, None] >= starts[:, None, :])
    work = torch.float32  # counts of at most P < 2^24: exact
    rank = torch.einsum("bpq,bqc->bpc", beats.to(work), pool.to(work)).long()  # [B, P, nC + 1]
    # index[b, c, m]: the pick in slot m of chunk c's memory; P (a row of fill values) where the slot is empty.
    kept = pool & (rank < capacity)
    slot = torch.where(kept, rank, capacity)  # slot ``capacity``: a discard bin for every pick not kept
    picks = torch.arange(count, device=device)[None, :, None].expand(bsz, -1, num_chunks + 1)
    bins = torch.full((bsz, num_chunks + 1, capacity + 1), count, dtype=torch.long, device=device)
    # Kept ranks are distinct (0 .. min(pool size, M) - 1): only the discard bin receives several picks.
    index = bins.scatter(2, slot.transpose(1, 2), picks.transpose(1, 2))[..., :capacity]
    rows = (index + torch.arange(bsz, device=device)[:, None, None] * (count + 1)).flatten()

    def fetch(field, fill):  # [B, nC, k, ...] -> [B, nC + 1, M, ...]: rows of the picks, or the fill row
        flat = field.flatten(1, 2)
        filler = torch.full_like(flat[:, :1], fill)
        table = torch.cat([flat, filler], dim=1).flatten(0, 1)  # [B (P + 1), ...]
        return table[rows].view(bsz, num_chunks + 1, capacity, *flat.shape[2:])

    fills = {"k": 0, "v": 0, "pos": 0, "score": INVALID_SCORE, "bias": 0}
    named = zip(EideticMemory._fields, candidates)
    memory = EideticMemory(*(None if f is None else fetch(f, fills[n]) for n, f in named))
    seen = EideticMemory(*(None if f is None else f[:, :num_chunks] for f in memory))
    final = EideticMemory(*(None if f is None else f[:, num_chunks] for f in memory))
    return seen, final


def memory_per_chunk(
    candidates: EideticMemory,
    capacity: int,
    *,
    chunk_size: int | None = None,
    decay: float = 1.0,
    delay: int = 0,
    chunk_doc_start: torch.Tensor | None = None,
) -> tuple[EideticMemory, EideticMemory]:
    """Run the memory over the chunks.

    Args:
        candidates: picks of every chunk, ``k, v [B, nC, k, F]``, ``pos, score [B, nC, k]``.
        capacity: ``M`` slots.
        chunk_size: ``C``; needed with ``decay < 1`` (scores age by ``pos // C``).
        decay: ``memory_score_decay``: each slot's score is multiplied by it at every chunk boundary.
        delay: chunk ``c``'s picks join the memory seen by chunk ``c + 1 + delay`` (0, or ``W / C`` for
            ``memory_admission="window_exit"``).
        chunk_doc_start: ``[B, nC]`` long, the document start of each chunk's first token
            (``memory_reset_at_document``): the memory seen by chunk ``c`` holds no token before it.

    Returns:
        ``(seen, final)``: ``seen`` has ``[B, nC, M, ...]`` fields, the memory as chunk ``c`` sees it (valid slots
        best first); ``final`` (``[B, M, ...]``) the memory a chunk after the last would see (no document drop
        beyond the last chunk's). Empty slots: ``score = INVALID_SCORE``, zero ``k, v`` and ``bias``.

    Two forms give the same memory: ``memory_per_chunk_closed`` (no loop) and ``memory_per_chunk_scan`` (one merge
    per chunk, linear in ``L``); this runs the closed form up to ``CLOSED_FORM_MAX_PICKS`` picks, the scan beyond.
    """
    form = memory_per_chunk_closed if candidates.pos[0].numel() <= CLOSED_FORM_MAX_PICKS else memory_per_chunk_scan
    return form(candidates, capacity, chunk_size=chunk_size, decay=decay, delay=delay, chunk_doc_start=chunk_doc_start)


def select_per_chunk(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    selections: int,
    capacity: int,
    *,
    decay: float = 1.0,
    delay: int = 0,
    doc_start: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[EideticMemory, EideticMemory]:
    """The whole policy over a sequence: ``scores [B, L]`` (``INVALID_SCORE`` at padding), ``k, v [B, L, F]``,
    ``bias [B, L]`` (``learned_selection``: each token's logit bias, carried by its slot) or ``None``.

    Returns ``(picks, seen)``: ``picks`` (``[B, nC, selections, ...]``) are every chunk's selections, ``seen``
    (``[B, nC, capacity, ...]``) the memory as chunk ``c`` sees it. Retention options (``memory_per_chunk``):
    ``decay``, ``delay``, and ``doc_start [B, L]`` (long, the first position of each token's document). The
    reference ``naive.select_per_chunk_ref`` has the same signature and result.
    """
    onehot, pick_score, pick_pos = topk_per_chunk(scores, chunk_size, selections)
    picked = (pick_score >= 0)[..., None]

    def take(x):  # empty picks (exhausted chunks) hold zeros, whatever the row they point at holds
        rows = take_selected(onehot, x)
        return torch.where(picked, rows, torch.zeros_like(rows))

    pick_bias = None if bias is None else take(bias[..., None])[..., 0]
    picks = EideticMemory(take(k), take(v), pick_pos, pick_score, pick_bias)
    starts = None if doc_start is None else doc_start[:, ::chunk_size]
    seen, _ = memory_per_chunk(
        picks, capacity, chunk_size=chunk_size, decay=decay, delay=delay, chunk_doc_start=starts
    )
    return picks, seen
