"""Reference (plain-loop, Python sorting) forms of the eidetic selection policy; for tests and the reference
backend. The policy is stated in ``chunk.py``."""

from __future__ import annotations

import torch

from .common import INVALID_SCORE, EideticMemory


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


def select_per_chunk_ref(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    selections: int,
    capacity: int,
    bias: torch.Tensor | None = None,
) -> tuple[EideticMemory, EideticMemory]:
    """Plain-loop reference of ``chunk.select_per_chunk`` (same signature and result; Python sorting, for tests and
    the reference backend). Slots are filled best first; keys and values are indexed rows of ``k, v``, so
    gradients reach the selected tokens as in the chunked form; so are the slots' ``bias`` (``bias [B, L]``)."""
    bsz, length = scores.shape
    order = lambda s: lambda j: (-s[j], j)  # noqa: E731  higher score first, then the earlier position

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
        memory: list[int] = []  # positions
        row_picks, row_seen = [], []
        for start in range(0, length, chunk_size):
            row_seen.append(slots(b, s, memory, capacity))
            chunk = [j for j in range(start, min(start + chunk_size, length)) if s[j] >= 0]
            chosen = sorted(chunk, key=order(s))[:selections]
            row_picks.append(slots(b, s, chosen, selections))
            memory = sorted(memory + chosen, key=order(s))[:capacity]
        picks.append([None if f[0] is None else torch.stack(f) for f in zip(*row_picks)])
        seen.append([None if f[0] is None else torch.stack(f) for f in zip(*row_seen)])
    stack = lambda rows: EideticMemory(*(None if f[0] is None else torch.stack(f) for f in zip(*rows)))  # noqa: E731
    return stack(picks), stack(seen)
