"""Pieces shared by the chunked and recurrent (decode) forms of B'MOJO attention."""

from __future__ import annotations

import torch

from ..common import cast


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
