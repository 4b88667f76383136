"""Chunked B'MOJO attention with static shapes.

The sequence is cut into chunks of ``C`` queries. A chunk ``c`` (queries ``[cC, cC+C)``) needs

* in-context keys ``[cC-W, cC+C)``: ``W+C`` keys, an overlapping window built from whole chunks (no gather);
* fading keys ``[cC-2W, cC+C-W)``: ``W+C`` keys of the fading sequence, the same trick shifted by ``W``;
* the ``M`` eidetic slots of the memory as it stands at the start of chunk ``c``.

Every chunk therefore scores ``C x (2(W+C) + M)`` entries: cost and memory grow linearly with ``L`` for a fixed
``W``. All chunks are computed at once; there is no Python loop and no data-dependent shape.

The key sets are concatenated and scored by **one** ``scaled_dot_product_attention`` call per chunk with a boolean
mask (``sdpa=True``, the default), the same joint softmax as scoring each set separately (``sdpa=False``, kept as
the cross-check). The eidetic keys are scored with other queries (``q_eid``, unrotated): queries and keys are then
concatenated along the feature axis, ``[q_rot | q_eid]`` against ``[k | 0]`` for in-context and fading keys and
``[0 | k_mem]`` for eidetic ones, so every score is the right dot product. A full window (``W >= L``) without
padding, fading or memory is plain causal attention: one ``is_causal`` call over the whole sequence.

The self fading key (``k_self``: query ``i``'s own fading token) is one more block of ``C`` keys per chunk, the
chunk's own self keys, under a diagonal mask. Logit biases (per head for a key set, per slot for the memory:
``memory.bias``) turn the boolean mask into an additive float mask: ``bias`` where visible, the dtype's minimum
where masked (exactly zero weight, since every row sees its own key). Without biases the boolean mask is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import compute_dtype
from ..selection.common import EideticMemory, map_slots
from .common import joint_softmax, query_span


def _chunk_windows(
    x: torch.Tensor, front: int, size: int, chunk: int, num_chunks: int, first: int = 0
) -> torch.Tensor:
    """``x [B, Lp, ...]`` -> ``[B, num_chunks, size, ...]``: the windows of chunks ``first .. first + num_chunks - 1``;
    window ``c`` holds positions ``[cC - front, cC - front + size)`` (zeros before the start and after the end).
    ``front`` and ``size`` are multiples of ``chunk``. Only the positions these windows cover are read.

    Built from whole chunks (``size / C`` shifted slices of the padded sequence seen as blocks of ``C``), not with
    ``unfold``: torch-xla 2.9 has no lowering for ``unfold`` and would run it on the CPU (tests/xla)."""
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
    xb = F.pad(xs, pad).unflatten(1, (blocks, chunk))  # [B, blocks, C, ...]
    return torch.cat([xb[:, j : j + num_chunks] for j in range(span)], dim=2)


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
    sdpa: bool = True,
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
        sdpa: one ``scaled_dot_product_attention`` call over the concatenated key sets (default), or a softmax over
            separately scored sets (``joint_softmax``); equal up to rounding.
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
    if sdpa and whole and plain and window >= padded:
        return _causal_sdpa(q, k, v, scale, ctype)
    if key_mask is None:
        key_mask = torch.ones(bsz, length, dtype=torch.bool, device=device)

    size = window + chunk  # keys per chunk in the in-context and fading windows

    def chunk_rows(x):  # [B, L, ...] -> the computed chunks' rows, [B, count, C, ...]
        x = x[:, first * chunk : last * chunk]
        return F.pad(x, [0, 0] * (x.dim() - 2) + [0, count * chunk - x.shape[1]]).unflatten(1, (count, chunk))

    def chunk_queries(x):  # [B, L, H, D] -> [B, count, C, Hkv, G, D]
        return chunk_rows(x).unflatten(3, (num_kv, groups)).to(ctype)

    def windows(x, front):  # [B, L, ...] -> [B, count, W + C, ...]: positions [cC - front, cC - front + W + C)
        return _chunk_windows(x, front, size, chunk, count, first)

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
    real = windows(key_flag, window)[..., 0].bool()  # [B, count, K]
    rel = qpos[:, :, None] - kpos[:, None, :]  # [nC, C, K]
    ctx_mask = (((rel >= 0) & (rel < window))[None] & real[:, :, None, :]) | (rel == 0)[None]
    keys = [windows(k, window)]
    vals = [windows(v, window)]
    masks = [ctx_mask]
    biases = [None]  # per key set: None or broadcastable to [B, nC, H, C, K]

    if k_fade is not None:
        # Fading keys: positions [cC - 2W, cC + C - W).
        fpos = kpos - window
        freal = windows(key_flag, 2 * window)[..., 0].bool()
        frel = qpos[:, :, None] - fpos[:, None, :]
        fade_mask = ((frel >= window) & (frel < 2 * window))[None] & freal[:, :, None, :]
        keys.append(windows(k_fade, 2 * window))
        vals.append(windows(v_fade, 2 * window))
        masks.append(fade_mask)
        biases.append(head_bias(fading_bias))

    if k_self is not None:
        # Self fading keys: the chunk's own C keys, query c*C+r seeing only key r (distance 0, always visible).
        keys.append(chunk_rows(k_self))
        vals.append(chunk_rows(v_self))
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
    if sdpa:
        mask = _additive_mask(masks, biases, ctype) if biased else torch.cat(masks, dim=-1)[:, :, None]
        out = _chunk_sdpa(qc, chunk_queries(q_eid) if memory is not None else None, keys, vals, memory, mask, scale)
        return _unchunk(out.to(q.dtype), end - start)
    scores = [score(qc, kw) for kw in keys]
    values = [weighted(vw) for vw in vals]
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


def _additive_mask(masks, biases, ctype):
    """Boolean masks ``[B, nC, C, K_n]`` and biases (``None`` or broadcastable to ``[B, nC, H, C, K_n]``) per key set
    -> one float mask ``[B, nC, 1 or H, C, K]``: the bias where visible, the dtype's minimum where masked."""
    # A tensor fill value in the mask's dtype: a Python float would enter an XLA graph as an f64 scalar.
    neg = torch.tensor(torch.finfo(ctype).min, dtype=ctype, device=masks[0].device)
    zero = torch.zeros((), dtype=ctype, device=masks[0].device)
    parts = [torch.where(m[:, :, None], zero if b is None else b, neg) for m, b in zip(masks, biases)]
    heads = max(p.shape[2] for p in parts)
    return torch.cat([p.expand(*p.shape[:2], heads, *p.shape[3:]) for p in parts], dim=-1)


def _chunk_sdpa(qc, qe, keys, vals, memory, mask, scale):
    """One softmax over all key sets of every chunk through ``scaled_dot_product_attention``.

    ``qc [B, nC, C, Hkv, G, D]`` (rotated queries), ``qe`` the same shape (eidetic queries) or ``None``; ``keys`` /
    ``vals``: ``[B, nC, K_n, Hkv, D]`` per in-context / fading / self set; ``memory``: the eidetic slots (``k, v [B,
    nC, M, Hkv, D]``) or ``None``; ``mask``: ``[B, nC, 1 or H, C, K]``, bool or additive float, over every set (the
    eidetic one last). Returns ``[B, nC, C, Hkv, G, D]`` in ``qc.dtype``."""
    bsz, num_chunks, chunk, num_kv, groups, head_dim = qc.shape
    k_all, v_all = torch.cat(keys, dim=2).to(qc.dtype), torch.cat(vals, dim=2).to(qc.dtype)
    if memory is not None:  # feature-concatenate: [q | q_eid] . [k | 0] and [0 | k_mem]
        q_all = torch.cat([qc, qe], dim=-1)
        k_all = torch.cat([F.pad(k_all, [0, head_dim]), F.pad(memory.k.to(qc.dtype), [head_dim, 0])], dim=2)
        v_all = torch.cat([v_all, memory.v.to(qc.dtype)], dim=2)
    else:
        q_all = qc
    width = q_all.shape[-1]
    n = bsz * num_chunks
    qh = q_all.reshape(n, chunk, num_kv * groups, width).transpose(1, 2)  # [n, H, C, E]
    kh = k_all.reshape(n, -1, num_kv, width).transpose(1, 2).repeat_interleave(groups, dim=1)  # [n, H, K, E]
    vh = v_all.reshape(n, -1, num_kv, head_dim).transpose(1, 2).repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.reshape(n, mask.shape[2], chunk, -1), scale=scale)
    return out.transpose(1, 2).reshape(bsz, num_chunks, chunk, num_kv, groups, head_dim)
