"""Chunked B'MOJO attention with static shapes.

The sequence is cut into chunks of ``C`` queries. A chunk ``c`` (queries ``[cC, cC+C)``) needs

* in-context keys ``[cC-W, cC+C)``: ``W+C`` keys, an overlapping window built from whole chunks (no gather);
* fading keys ``[cC-2W, cC+C-W)``: ``W+C`` keys of the fading sequence, the same trick shifted by ``W``;
* the ``M`` eidetic slots of the memory as it stands at the start of chunk ``c``.

Every chunk therefore scores ``C x (2(W+C) + M)`` entries: cost and memory grow linearly with ``L`` for a fixed
``W``. All chunks are computed at once; there is no Python loop and no data-dependent shape.

The key sets are concatenated and go through **one** softmax per chunk (``fused=True``, the default): the rotated
queries score the in-context, fading and self keys in one matmul, the eidetic queries (``q_eid``, unrotated) the
memory slots in another, and one matmul weighs the concatenated values; the same joint softmax as scoring each set
separately (``fused=False``, kept as the cross-check). A full window (``W >= L``) without padding, fading or memory
is plain causal attention: one ``scaled_dot_product_attention(is_causal=True)`` call over the whole sequence.

The self fading key (``k_self``: query ``i``'s own fading token) is one more block of ``C`` keys per chunk, the
chunk's own self keys, under a diagonal mask. Logit biases (per head for a key set, per slot for the memory:
``memory.bias``) are added to the scores; masked scores are then replaced by the dtype's minimum (exactly zero
weight, since every row sees its own key).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import compute_dtype, custom_backward_applies
from ..selection.common import EideticMemory, map_slots
from .common import joint_softmax, query_span


def _window_blocks(
    x: torch.Tensor, front: int, size: int, chunk: int, num_chunks: int, first: int = 0
) -> tuple[torch.Tensor, int]:
    """``x [B, Lp, ...]`` -> ``(xb [B, num_chunks + span - 1, C, ...], span)``: the blocks of ``C`` positions whose
    runs of ``span = size / C`` make the windows of chunks ``first .. first + num_chunks - 1`` (``_concat_windows``);
    window ``c`` holds positions ``[cC - front, cC - front + size)`` (zeros before the start and after the end).
    ``front`` and ``size`` are multiples of ``chunk``. Only the positions these windows cover are read.

    Windows are built from whole chunks (``span`` shifted slices of the padded sequence seen as blocks of ``C``), not
    with ``unfold``: torch-xla 2.9 has no lowering for ``unfold`` and would run it on the CPU (tests/xla)."""
    if front % chunk or size % chunk:
        raise ValueError(f"window offsets ({front}, {size}) must be multiples of the chunk size {chunk}")
    span = size // chunk
    blocks = num_chunks + span - 1
    total = blocks * chunk
    start = first * chunk - front  # the first position covered (negative: before the sequence)
    lo = max(start, 0)
    xs = x[:, lo : max(lo, min(start + total, x.shape[1]))]
    before = min(lo - start, total)
    pad = [0, 0] * (x.dim() - 2) + [before, total - before - xs.shape[1]]
    return F.pad(xs, pad).unflatten(1, (blocks, chunk)), span


def _concat_windows(sets: list[tuple[torch.Tensor, int]], heads_first: bool = False) -> torch.Tensor:
    """Key (or value) sets as blocks and spans (``_window_blocks``; a set of one block per chunk has span 1) -> their
    per-chunk windows concatenated in order: ``[B, nC, K, Hkv, D]``, or with ``heads_first`` ``[B, Hkv, nC, K, D]``
    (the layout the fused attention's matmuls take without another copy). With a gradient to compute, through
    ``_ConcatWindows`` (its backward); otherwise, and in a traced graph (``torch.jit.trace`` cannot save a Python
    autograd function), the same concatenation as plain ops."""
    spans, blocks = tuple(span for _, span in sets), [xb for xb, _ in sets]
    if custom_backward_applies(*blocks):
        return _ConcatWindows.apply(heads_first, spans, *blocks)
    return _cat_windows(heads_first, spans, blocks)


def _cat_windows(heads_first: bool, spans: tuple[int, ...], blocks: list[torch.Tensor]) -> torch.Tensor:
    """Window ``c`` of a set ``(xb, span)`` is blocks ``c .. c + span - 1`` of ``xb [B, blocks, C_n, ...]``; every
    set's windows concatenated in one copy (see ``_concat_windows``)."""
    count = blocks[0].shape[1] - spans[0] + 1
    pieces = [xb[:, j : j + count] for xb, span in zip(blocks, spans) for j in range(span)]
    if heads_first:  # [B, nC, C_n, Hkv, D] -> [B, Hkv, nC, C_n, D], concatenated along the keys
        return torch.cat([piece.permute(0, 3, 1, 2, 4) for piece in pieces], dim=3)
    return torch.cat(pieces, dim=2)


class _ConcatWindows(torch.autograd.Function):
    """``_cat_windows`` with its own backward. Autograd's backward of a concatenation of shifted slices gives every
    slice a zero-filled gradient of its whole input and sums them (``span`` full-size fills, copies and adds per
    input); this backward adds each slice's gradient into one buffer per input, in place."""

    @staticmethod
    def forward(ctx, heads_first, spans, *blocks):
        ctx.heads_first, ctx.spans = heads_first, spans
        ctx.shapes = [xb.shape for xb in blocks]
        return _cat_windows(heads_first, spans, list(blocks))

    @staticmethod
    def backward(ctx, grad):
        if ctx.heads_first:
            grad = grad.permute(0, 2, 3, 1, 4)  # back to [B, nC, K, Hkv, D]
        count = grad.shape[1]
        sizes = [shape[2] for shape, span in zip(ctx.shapes, ctx.spans) for _ in range(span)]
        pieces = iter(grad.split(sizes, dim=2))
        grads = []
        for shape, span, needed in zip(ctx.shapes, ctx.spans, ctx.needs_input_grad[2:]):
            parts = [next(pieces) for _ in range(span)]
            if not needed:  # e.g. a detached memory's values
                grads.append(None)
            elif span == 1 and shape[1] == count:
                grads.append(parts[0].contiguous())
            else:
                out = grad.new_zeros(shape)
                for j, part in enumerate(parts):
                    out[:, j : j + count] += part
                grads.append(out)
        return None, None, *grads


# Long on purpose: the chunked algorithm as one listing (as mamba's ssd_minimal), so it reads against the
# reference (naive.py) line by line.
def bmojo_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    chunk_size: int,
    k_fade: torch.Tensor | None = None,
    v_fade: torch.Tensor | None = None,
    q_eid: torch.Tensor | None = None,
    memory: EideticMemory | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    fading_bias: torch.Tensor | None = None,
    self_bias: torch.Tensor | None = None,
    eidetic_bias: torch.Tensor | None = None,
    k_self: torch.Tensor | None = None,
    v_self: torch.Tensor | None = None,
    fused: bool = True,
    doc_start: torch.Tensor | None = None,
    query_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Chunked B'MOJO attention; same result as :func:`bmojo_attention_ref`.

    Args:
        q: ``[B, L, H, D]``; k, v: ``[B, L, Hkv, D]``; k_fade, v_fade: ``[B, L, Hkv, D]`` or ``None``.
        window: ``W``, a multiple of ``chunk_size``.
        q_eid: ``[B, L, H, D]`` queries for the eidetic scores.
        memory: ``EideticMemory`` with ``k, v [B, nC, M, Hkv, D]``, ``pos, score [B, nC, M]``: the eidetic memory
            seen by each chunk (``nC = ceil(L / chunk_size)``). Slot ``m`` is visible to query ``i`` iff it is
            valid (``score >= 0``) and ``pos <= i - W``. ``memory.bias [B, nC, M]`` (or ``None``) is added to the
            slots' logits.
        key_mask: ``[B, L]`` bool, ``False`` at padding keys.
        fading_bias, self_bias, eidetic_bias: ``[H]`` logit biases per query head, or ``None``; see the reference.
        k_self, v_self: ``[B, L, Hkv, D]`` the self fading key and value of each query, or ``None``.
        fused: one softmax over the concatenated key sets of each chunk (default, ``_chunk_attention``), or a softmax
            over separately scored sets (``joint_softmax``); equal up to rounding.
        doc_start: ``[B, L]`` long, the first position of each query's document, or ``None``: slot ``m`` is then
            also hidden from query ``i`` when ``pos < doc_start[i]`` (``memory_reset_at_document``).
        query_range: ``(start, end)``: compute the outputs of queries ``[start, end)`` only (``start`` a multiple
            of ``chunk_size``, ``end`` clipped to ``L``), reading only the keys and memories those queries see; the
            same values as the whole op's ``[:, start:end]``. ``None``: every query. The attention op's
            intermediates scale with the queries computed, so a long sequence can be computed (and recomputed,
            ``layers.common.run_op``) in groups of queries.

    Returns:
        ``[B, L, H, D]`` in ``q.dtype`` (``[B, end - start, H, D]`` with ``query_range``).

    Raises:
        ValueError: a ``query_range`` that is empty, outside the sequence or does not start on a chunk boundary.
    """
    bsz, length, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    groups = num_heads // num_kv
    chunk = chunk_size
    num_chunks = -(-length // chunk)
    padded = num_chunks * chunk
    # A window longer than the (padded) sequence sees everything: clamp it so W >= L stays O(L^2), not O(L*W).
    window = min(window, padded)
    scale = head_dim**-0.5 if scale is None else scale
    ctype = compute_dtype(q)
    device = q.device
    start, end = query_span(query_range, length, chunk)
    first, last = start // chunk, -(-end // chunk)  # the query chunks computed: [first, last)
    count = last - first
    whole = start == 0 and end == length
    plain = k_fade is None and k_self is None and memory is None and key_mask is None
    if fused and whole and plain and window >= padded:
        return _causal_sdpa(q, k, v, scale, ctype)
    if key_mask is None:
        key_mask = torch.ones(bsz, length, dtype=torch.bool, device=device)

    size = window + chunk  # keys per chunk in the in-context and fading windows

    def chunk_rows(x):  # [B, L, ...] -> the computed chunks' rows, [B, count, C, ...]
        x = x[:, first * chunk : last * chunk]
        return F.pad(x, [0, 0] * (x.dim() - 2) + [0, count * chunk - x.shape[1]]).unflatten(1, (count, chunk))

    def chunk_queries(x):  # [B, L, H, D] -> [B, count, C, Hkv, G, D]
        return chunk_rows(x).unflatten(3, (num_kv, groups)).to(ctype)

    def windows(x, front):  # [B, L, ...] -> blocks and span of the windows [cC - front, cC - front + W + C)
        return _window_blocks(x, front, size, chunk, count, first)

    def head_bias(bias):  # [H] -> [1, 1, H, 1, 1]: a key set's bias in the [B, nC, H, C, K] layout
        return None if bias is None else bias.to(ctype).view(1, 1, num_heads, 1, 1)

    def score(qc, kw):  # qc [B,nC,C,Hkv,G,D], kw [B,nC,K,Hkv,D] -> [B,nC,Hkv,G,C,K]
        return torch.einsum("bncagd,bnkad->bnagck", qc, kw.to(ctype)) * scale

    def weighted(vw):  # vw [B,nC,K,Hkv,D]
        return lambda p: torch.einsum("bnagck,bnkad->bncagd", p, vw.to(ctype))

    qc = chunk_queries(q)
    qpos = torch.arange(first * chunk, last * chunk, device=device).view(count, chunk)  # [count, C]
    cidx = qpos[:, :1]

    # In-context keys: positions [cC - W, cC + C).
    kpos = cidx - window + torch.arange(size, device=device)[None, :]  # [nC, K]
    key_flag = key_mask[..., None].to(torch.uint8)  # F.pad does not take bool tensors
    real = _concat_windows([windows(key_flag, window)])[..., 0].bool()  # [B, count, K]
    rel = qpos[:, :, None] - kpos[:, None, :]  # [nC, C, K]
    ctx_mask = (((rel >= 0) & (rel < window))[None] & real[:, :, None, :]) | (rel == 0)[None]
    keys = [windows(k, window)]  # per key set: (blocks, span), see _window_blocks
    vals = [windows(v, window)]
    masks = [ctx_mask]
    biases = [None]  # per key set: None or broadcastable to [B, nC, H, C, K]

    if k_fade is not None:
        # Fading keys: positions [cC - 2W, cC + C - W).
        fpos = kpos - window
        freal = _concat_windows([windows(key_flag, 2 * window)])[..., 0].bool()
        frel = qpos[:, :, None] - fpos[:, None, :]
        fade_mask = ((frel >= window) & (frel < 2 * window))[None] & freal[:, :, None, :]
        keys.append(windows(k_fade, 2 * window))
        vals.append(windows(v_fade, 2 * window))
        masks.append(fade_mask)
        biases.append(head_bias(fading_bias))

    if k_self is not None:
        # Self fading keys: the chunk's own C keys, query c*C+r seeing only key r (distance 0, always visible).
        keys.append((chunk_rows(k_self), 1))
        vals.append((chunk_rows(v_self), 1))
        masks.append(torch.eye(chunk, dtype=torch.bool, device=device).expand(bsz, count, chunk, chunk))
        biases.append(head_bias(self_bias))

    if memory is not None:
        if not whole:  # the memories of the computed chunks: [B, count, M, ...]
            memory = map_slots(lambda x: x[:, first:last], memory)
        mem_k, mem_v, mem_pos, mem_valid = memory.k, memory.v, memory.pos, memory.valid
        eid_mask = mem_valid[:, :, None, :] & (mem_pos[:, :, None, :] <= qpos[None, :, :, None] - window)
        if doc_start is not None:
            starts = chunk_rows(doc_start)
            eid_mask = eid_mask & (mem_pos[:, :, None, :] >= starts[..., None])
        masks.append(eid_mask)
        eid_bias = head_bias(eidetic_bias)
        if memory.bias is not None:  # per slot (learned selection): [B, nC, M] -> [B, nC, 1, 1, M]
            slot_bias = memory.bias.to(ctype)[:, :, None, None, :]
            eid_bias = slot_bias if eid_bias is None else eid_bias + slot_bias
        biases.append(eid_bias)

    biased = any(b is not None for b in biases)
    if fused:
        out = _chunk_attention(qc, chunk_queries(q_eid) if memory is not None else None, keys, vals, memory, masks,
                               biases, scale)
        return _unchunk(out.to(q.dtype), end - start)
    scores = [score(qc, _concat_windows([kw])) for kw in keys]
    values = [weighted(_concat_windows([vw])) for vw in vals]
    if memory is not None:
        scores.append(score(chunk_queries(q_eid), mem_k))
        values.append(weighted(mem_v))
    if biased:  # [B, nC, H, C, K] -> the scores' [B, nC, Hkv, G, C, K]
        scores = [sc if b is None else sc + _by_kv_head(b, num_kv, groups) for sc, b in zip(scores, biases)]
    out = joint_softmax(scores, [m[:, :, None, None] for m in masks], values, q.dtype)  # [B, nC, C, Hkv, G, D]
    return _unchunk(out, end - start)


def _unchunk(out, queries):
    """``[B, n, C, Hkv, G, D]`` -> ``[B, queries, H, D]``: the computed chunks' first ``queries`` rows (the rest are
    the padding of a ragged last chunk or queries past the range's end)."""
    return out.flatten(3, 4).flatten(1, 2)[:, :queries]


def _causal_sdpa(q, k, v, scale, ctype):
    """Full causal attention, ``q [B, L, H, D]``, ``k, v [B, L, Hkv, D]`` -> ``[B, L, H, D]`` in ``q.dtype``."""
    groups = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).to(ctype)
    kh, vh = (x.transpose(1, 2).repeat_interleave(groups, dim=1).to(ctype) for x in (k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def _by_kv_head(bias, num_kv, groups):
    """A bias ``[B, nC, H or 1, C, K]`` in the grouped scores' layout ``[B, nC, Hkv or 1, G or 1, C, K]``."""
    return bias.unflatten(2, (num_kv, groups)) if bias.shape[2] == num_kv * groups else bias.unsqueeze(2)


def _set_biases(masks, biases, ctype):
    """Per key set a bias (``None`` or broadcastable to ``[B, nC, H, C, K_n]``) -> one bias ``[B, nC, 1 or H, C, K]``
    over the concatenated sets (zero for a set without one); ``masks`` (``[B, nC, C, K_n]``) give the shapes."""
    parts = [
        torch.zeros((), dtype=ctype, device=m.device).expand(m[:, :, None].shape) if b is None
        else b.to(ctype).expand(*m.shape[:2], b.shape[2], *m.shape[2:])
        for m, b in zip(masks, biases)
    ]
    heads = max(p.shape[2] for p in parts)
    return torch.cat([p.expand(*p.shape[:2], heads, *p.shape[3:]) for p in parts], dim=-1)


def _chunk_attention(qc, qe, keys, vals, memory, masks, biases, scale):
    """One softmax over all key sets of every chunk, as two score matmuls and one value matmul.

    ``qc [B, nC, C, Hkv, G, D]`` (rotated queries), ``qe`` the same shape (eidetic queries) or ``None``; ``keys`` /
    ``vals``: per in-context / fading / self set its blocks and span (``_window_blocks``); ``memory``: the eidetic
    slots (``k, v [B, nC, M, Hkv, D]``) or ``None``; ``masks``: bool ``[B, nC, C, K_n]`` per set (the eidetic one
    last), ``biases``: ``None`` or broadcastable to ``[B, nC, H, C, K_n]`` per set. Returns ``[B, nC, C, Hkv, G, D]``
    in ``qc.dtype``.

    Everything runs heads first, ``[B, Hkv, nC, rows, D]``: the key sets' windows are concatenated into that layout in
    one copy (``_concat_windows``), grouped query heads are rows of their key head (``G * C`` rows), so no key or value
    is repeated per query head and the matmuls read their operands as they are. The rotated queries score the
    in-context, fading and self keys in one matmul, the eidetic queries the memory slots in another; the scores are
    joined, masked with ``where`` (so a masked key's score never reaches the softmax, also when it is not finite), and
    one matmul weighs the concatenated values. (``scaled_dot_product_attention`` does not fit: with queries of width
    2D, for the eidetic scores, against values of width D it runs its math fallback, which scales and repeats every
    key: the whole op measured ~1.5x slower than this form, forward and backward.)"""
    bsz, num_chunks, chunk, num_kv, groups, head_dim = qc.shape
    dtype = qc.dtype

    def grouped_queries(x):  # [B, nC, C, Hkv, G, D] -> [B, Hkv, nC, G * C, D], scaled
        x = x.permute(0, 3, 1, 4, 2, 5) * scale
        return x.reshape(bsz, num_kv, num_chunks, groups * chunk, head_dim)

    key_sets = _concat_windows(keys, heads_first=True).to(dtype)  # [B, Hkv, nC, K, D]
    scores = torch.matmul(grouped_queries(qc), key_sets.transpose(-1, -2))  # [B, Hkv, nC, G * C, K]
    if memory is not None:
        mem_k = memory.k.to(dtype).permute(0, 3, 1, 2, 4)  # [B, Hkv, nC, M, D]
        scores = torch.cat([scores, torch.matmul(grouped_queries(qe), mem_k.transpose(-1, -2))], dim=-1)
        vals = [*vals, (memory.v, 1)]
    values = _concat_windows(vals, heads_first=True).to(dtype)  # [B, Hkv, nC, K (+ M), D]
    # Softmax math in the compute dtype: under bf16 autocast the matmuls return bf16 scores.
    scores = scores.to(dtype).view(bsz, num_kv, num_chunks, groups, chunk, -1)

    def grouped(x):  # [B, nC, 1 or H, C, K] -> [B, 1 or Hkv, nC, 1 or G, C, K] (a view)
        if x.shape[2] == 1:
            return x.unsqueeze(1)
        return x.unflatten(2, (num_kv, groups)).transpose(1, 2)

    visible = grouped(torch.cat(masks, dim=-1)[:, :, None])
    # A tensor fill value in the scores' dtype: a Python float would enter an XLA graph as an f64 scalar.
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=scores.device)
    if any(b is not None for b in biases):
        scores = scores + grouped(_set_biases(masks, biases, dtype))
    probs = torch.softmax(torch.where(visible, scores, neg), dim=-1)
    out = torch.matmul(probs.flatten(3, 4), values)  # [B, Hkv, nC, G * C, D]
    return out.view(bsz, num_kv, num_chunks, groups, chunk, head_dim).permute(0, 2, 4, 1, 3, 5)
