"""Reference (plain-loop, Python sorting) forms of the eidetic selection policy; for tests and the reference
backend. The policy is stated in ``chunk.py``.

Retention options, as the issue states them (the fast forms compute the same order in closed form):

* ``decay``: at every chunk boundary each memory slot's score is multiplied by ``decay`` before the merge;
* ``delay``: chunk ``c``'s picks join the memory at the start of chunk ``c + 1 + delay`` (0: ``"chunk"``
  admission; ``W / C``: ``"window_exit"``, when the whole chunk has left the window);
* ``doc_start [B, L]``: at the start of chunk ``c`` every slot (and every joining pick) from before the document
  of the chunk's first token is dropped; query ``i`` sees no slot before ``doc_start[i]``.

Here decayed scores are Python floats multiplied at every boundary; the fast forms rank by a float32 key with the
same order (``recurrent.retention_key``), so the two can disagree only where two decayed scores tie to float32
rounding.
"""

from __future__ import annotations

import torch

from .common import INVALID_SCORE, EideticMemory


def _policy_ref(s, length, chunk_size, selections, capacity, decay, delay, starts):
    """For each chunk ``c`` of a row with scores ``s`` (list): ``(memory seen by chunk c, picks of chunk c)``, both
    position lists best first. ``starts``: the document start of each chunk's first token, or ``None``."""
    current: dict[int, float] = {}  # remembered position -> its (decayed) score
    picks: list[list[int]] = []
    out = []
    for c, start in enumerate(range(0, length, chunk_size)):
        if c > 0:  # a chunk boundary
            current = {j: score * decay for j, score in current.items()}
            if c - 1 - delay >= 0:
                current.update({j: s[j] for j in picks[c - 1 - delay]})
            if starts is not None:
                current = {j: score for j, score in current.items() if j >= starts[c]}
            kept = sorted(current, key=lambda j: (-current[j], j))[:capacity]
            current = {j: current[j] for j in kept}
        memory = sorted(current, key=lambda j: (-current[j], j))
        chunk = [j for j in range(start, min(start + chunk_size, length)) if s[j] >= 0]
        picks.append(sorted(chunk, key=lambda j: (-s[j], j))[:selections])
        out.append((memory, picks[-1]))
    return out


def eidetic_mask_ref(
    scores: torch.Tensor,
    chunk_size: int,
    k: int,
    capacity: int,
    window: int,
    decay: float = 1.0,
    delay: int = 0,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-loop reference of the policy: ``[B, L, L]`` bool, ``True`` where query ``i`` sees token ``j`` through
    the eidetic memory. Uses Python sorting; for tests only."""
    bsz, length = scores.shape
    mask = torch.zeros(bsz, length, length, dtype=torch.bool)
    for b in range(bsz):
        starts = None if doc_start is None else doc_start[b].tolist()
        chunk_starts = None if starts is None else starts[::chunk_size]
        policy = _policy_ref(scores[b].tolist(), length, chunk_size, k, capacity, decay, delay, chunk_starts)
        for c, (memory, _) in enumerate(policy):
            for i in range(c * chunk_size, min((c + 1) * chunk_size, length)):
                for j in memory:
                    if j <= i - window and (starts is None or j >= starts[i]):
                        mask[b, i, j] = True
    return mask


def select_per_chunk_ref(
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
    """Plain-loop reference of ``chunk.select_per_chunk`` (same signature and result; Python sorting, for tests and
    the reference backend). Slots are filled best first; keys and values are indexed rows of ``k, v``, so
    gradients reach the selected tokens as in the chunked form; so are the slots' ``bias`` (``bias [B, L]``)."""
    bsz, length = scores.shape

    def slots(b, s, chosen, size):
        rows = [j for j in chosen][:size]
        pad = size - len(rows)
        take = lambda x: torch.stack([x[b, j] for j in rows] + [torch.zeros_like(x[b, 0])] * pad)  # noqa: E731
        pos = torch.tensor(rows + [0] * pad, dtype=torch.long, device=scores.device)
        score = torch.tensor([s[j] for j in rows] + [INVALID_SCORE] * pad, dtype=torch.float32, device=scores.device)
        return take(k), take(v), pos, score, None if bias is None else take(bias)

    picks, seen = [], []
    for b in range(bsz):
        s = scores[b].tolist()
        starts = None if doc_start is None else doc_start[b, ::chunk_size].tolist()
        policy = _policy_ref(s, length, chunk_size, selections, capacity, decay, delay, starts)
        row_picks = [slots(b, s, chosen, selections) for _, chosen in policy]
        row_seen = [slots(b, s, memory, capacity) for memory, _ in policy]
        picks.append([None if f[0] is None else torch.stack(f) for f in zip(*row_picks)])
        seen.append([None if f[0] is None else torch.stack(f) for f in zip(*row_seen)])
    stack = lambda rows: EideticMemory(*(None if f[0] is None else torch.stack(f) for f in zip(*rows)))  # noqa: E731
    return stack(picks), stack(seen)
