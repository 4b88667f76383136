"""Pieces shared by the chunked and recurrent (decode) forms of B'MOJO attention."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..common import cast, custom_backward_applies
from ..selection.common import EideticMemory, map_slots

# The attention op's inputs with one row per position (``[B, L, ...]``), by keyword; ``doc_start`` holds positions.
SEQUENCE_INPUTS = ("q", "k", "v", "k_fade", "v_fade", "q_eid", "key_mask", "k_self", "v_self", "doc_start")


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


class KeyContextBlock(NamedTuple):
    """One block of queries of the attention op and the key context before it, as pieces (views) of the whole
    sequence's inputs: the op over ``assemble()``'s inputs with ``query_range`` gives the block's outputs.

    ``offset``: the sequence position of the first row of the assembled inputs; ``query_range``: the block's
    queries counted from there; ``inputs``: per input name (``SEQUENCE_INPUTS``), the pieces covering positions
    ``[offset, block end)``, or ``None``; ``memory``: the eidetic memory's fields as pieces of whole chunks, or
    ``None``."""

    query_range: tuple[int, int]
    offset: int
    inputs: dict[str, tuple[torch.Tensor, ...] | None]
    memory: EideticMemory | None

    def assemble(self) -> tuple[dict[str, torch.Tensor | None], EideticMemory | None]:
        """The block's inputs as tensors (the pieces concatenated) and its memory; positions (``doc_start``, the
        slots' ``pos``) counted from ``offset``, so the op sees a sequence that starts there. Run inside the
        recomputed region: the concatenations are then rebuilt in the backward, not kept."""
        x = {name: None if p is None else _join(p) for name, p in self.inputs.items()}
        if x.get("doc_start") is not None:
            x["doc_start"] = x["doc_start"] - self.offset
        memory = self.memory
        if memory is not None:
            memory = map_slots(_join, memory)
            memory = memory._replace(pos=memory.pos - self.offset)
        return x, memory


class _JoinPieces(torch.autograd.Function):
    """``torch.cat(pieces, dim=1)`` whose backward gives each piece a gradient of its own. ``cat``'s backward gives
    views into the block's gradient, and a view keeps all of it alive until the split's backward runs after the
    last block: ``1 + context / block`` times each input's gradient held at once instead of one."""

    @staticmethod
    def forward(ctx, *pieces):
        ctx.sizes = [p.shape[1] for p in pieces]
        return torch.cat(pieces, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return tuple(g.clone() for g in grad.split(ctx.sizes, dim=1))


def _join(pieces: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The pieces of a block's input as one tensor (along dim 1); see ``_JoinPieces``."""
    if len(pieces) == 1:
        return pieces[0]
    if custom_backward_applies(*pieces):
        return _JoinPieces.apply(*pieces)
    return torch.cat(pieces, dim=1)


def key_context_blocks(
    block: int, context: int, chunk: int, inputs: dict[str, torch.Tensor | None], memory: EideticMemory | None
) -> list[KeyContextBlock]:
    """The attention op's inputs cut into blocks of ``block`` queries, each with the ``context`` positions before
    it that its keys reach (``W``; ``2W`` with fading keys), rounded up to whole blocks.

    ``inputs``: the op's sequence inputs by name (``[B, L, ...]`` or ``None``); ``memory``: ``[B, nC, ...]`` per
    field (``nC = ceil(L / chunk)``) or ``None``; ``block`` a multiple of ``chunk``. Every input is split once
    (``torch.split``) and each block takes views of its pieces, so the backward adds each block's gradient into
    its own pieces only: ``O(L (1 + ceil(context / block)))`` in all. Slicing the whole inputs per block would instead
    add a zero-filled full-length gradient per block and input, ``O(L^2 / block)``."""
    if block % chunk:
        raise ValueError(f"a block of {block} queries must be whole chunks of {chunk}")
    length = inputs["q"].shape[1]
    pieces = {name: None if x is None else x.split(block, dim=1) for name, x in inputs.items()}
    memory_pieces = None if memory is None else map_slots(lambda x: x.split(block // chunk, dim=1), memory)
    back = -(-context // block)  # whole blocks of context before each block
    blocks = []
    for index, start in enumerate(range(0, length, block)):
        first = max(0, index - back)
        offset = first * block
        blocks.append(KeyContextBlock(
            (start - offset, min(start + block, length) - offset),
            offset,
            {name: None if p is None else p[first : index + 1] for name, p in pieces.items()},
            None if memory is None else map_slots(lambda p: p[first : index + 1], memory_pieces),
        ))
    return blocks


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
