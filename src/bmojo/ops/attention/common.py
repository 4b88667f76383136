"""Pieces shared by the chunked and recurrent (decode) forms of B'MOJO attention."""

from __future__ import annotations

import torch

from ..common import cast


def query_span(query_range, length: int, chunk: int | None = None) -> tuple[int, int]:
    """``query_range`` (or ``None``: every query) -> ``(start, end)`` with ``end`` clipped to ``length``.

    Raises ``ValueError`` (one line, the rule broken named) for an empty range, one outside the sequence, or, with
    ``chunk``, a start off the chunk grid."""
    if query_range is None:
        return 0, length
    start, end = query_range
    if not 0 <= start < min(end, length):
        raise ValueError(
            f"query_range {tuple(query_range)}: must hold at least one of the {length} queries (0 <= start < end)"
        )
    if chunk is not None and start % chunk:
        raise ValueError(f"query_range {tuple(query_range)}: start must be a multiple of the chunk size {chunk}")
    return start, min(end, length)


def joint_softmax(score_blocks, mask_blocks, value_blocks, out_dtype):
    """One softmax over the concatenation of several key sets.

    ``score_blocks[n]``: ``[..., Q, K_n]``; ``mask_blocks[n]`` broadcastable to it (bool);
    ``value_blocks[n]``: callable mapping probabilities ``[..., Q, K_n]`` to the weighted value sum.
    """
    # A tensor fill value in the scores' dtype: a Python float would enter an XLA graph as an f64 scalar.
    first = score_blocks[0]
    neg = torch.tensor(torch.finfo(first.dtype).min, dtype=first.dtype, device=first.device)
    s = torch.cat([sc.masked_fill(~m, neg) for sc, m in zip(score_blocks, mask_blocks)], dim=-1)
    p = torch.softmax(s, dim=-1)
    out, start = 0, 0
    for sc, m, val in zip(score_blocks, mask_blocks, value_blocks):
        width = sc.shape[-1]
        # Multiply by the mask so a fully masked block contributes exact zeros.
        out = out + val(p[..., start : start + width] * m)
        start += width
    return cast(out, out_dtype)
