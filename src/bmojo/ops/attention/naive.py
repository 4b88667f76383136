"""Dense masked reference of B'MOJO attention: the truth the chunked and recurrent forms are tested against.

Query ``i`` attends three key sets under one joint softmax:

* in-context: tokens ``j`` in ``[i-W+1, i]`` (keys ``k``, values ``v``);
* fading: the SSM's fading tokens ``j`` in ``[i-2W+1, i-W]`` (keys ``k_fade``, values ``v_fade``);
* eidetic: the valid slots ``m`` of the memory seen by query ``i``'s chunk with ``pos <= i - W``
  (and ``pos >= doc_start[i]`` when documents reset the memory; scores ``q_eid . memory.k``, values
  ``memory.v``);
* self fading (optional): query ``i``'s own fading token, key ``k_self[i]`` and value ``v_self[i]``.

Optional logit biases (``key_set_bias``): per query head ``fading_bias`` on every fading key, ``self_bias`` on the
self fading key, ``eidetic_bias`` on every eidetic slot, plus ``memory.bias`` per slot (learned selection). A bias is
added to the scaled score (``q . k * scale + bias``); masked entries keep exactly zero weight.

Cost and memory are O(L^2); use it for tests only.
"""

from __future__ import annotations

import torch

from ..common import compute_dtype, expand_groups
from ..selection.common import EideticMemory
from .common import query_span


# Long on purpose: the reference is one plain listing of the three key sets and their masks.
def bmojo_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    chunk_size: int | None = None,
    k_fade: torch.Tensor | None = None,
    v_fade: torch.Tensor | None = None,
    q_eid: torch.Tensor | None = None,
    memory: EideticMemory | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    fading_bias: torch.Tensor | None = None,
    self_bias: torch.Tensor | None = None,
    eidetic_bias: torch.Tensor | None = None,
    k_self: torch.Tensor | None = None,
    v_self: torch.Tensor | None = None,
    query_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Dense B'MOJO attention; the signature of ``bmojo_attention_chunked``.

    Args:
        q: ``[B, L, H, D]`` queries (rotary already applied).
        k, v: ``[B, L, Hkv, D]`` in-context keys (rotary applied) and values.
        window: ``W``.
        chunk_size: ``C``, which memory a query sees (query ``i`` sees ``memory[:, i // C]``); needed only with
            ``memory``.
        k_fade, v_fade: ``[B, L, Hkv, D]`` keys/values of the fading tokens, or ``None`` (no fading memory).
        q_eid: ``[B, L, H, D]`` queries used for eidetic scores.
        memory: ``EideticMemory`` with ``k, v [B, nC, M, Hkv, D]``, ``pos, score [B, nC, M]`` (and ``bias [B, nC,
            M]`` or ``None``), or ``None``.
        key_mask: ``[B, L]`` bool, ``False`` at padding keys. A query always sees itself, so no row is empty.
        scale: softmax scale, default ``D ** -0.5``.
        doc_start: ``[B, L]`` long, the first position of each query's document, or ``None``: eidetic slots from
            earlier documents (``pos < doc_start[i]``) are hidden from query ``i`` (``memory_reset_at_document``).
        fading_bias, self_bias, eidetic_bias: ``[H]`` logit bias per query head of the fading keys, of the self
            fading key and of the eidetic slots, or ``None`` (no bias). A bias of an absent key set is ignored.
        k_self, v_self: ``[B, L, Hkv, D]`` the self fading key (rotary at position ``i``) and value of each query,
            attended at distance 0 and always visible, or ``None``.
        query_range: ``(start, end)``: the outputs of queries ``[start, end)`` only (``end`` clipped to ``L``),
            or ``None``. The reference computes every query and returns the slice.

    Returns:
        ``[B, L, H, D]`` in ``q.dtype`` (``[B, end - start, H, D]`` with ``query_range``); computed in float32
        (float64 for float64 inputs).
    """
    bsz, length, num_heads, head_dim = q.shape
    first, end = query_span(query_range, length)  # the reference computes every query, then slices
    scale = head_dim**-0.5 if scale is None else scale
    ctype = compute_dtype(q)
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    real = torch.ones(bsz, 1, length, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        real = key_mask[:, None, :].bool()

    def up(x):
        return expand_groups(x, num_heads).to(ctype)

    neg = torch.finfo(ctype).min

    def biased(block, bias):  # block [B, H, L, K] + bias [H] per head
        return block if bias is None else block + bias.to(ctype)[None, :, None, None]

    ctx_mask = (((j <= i) & (j > i - window))[None] & real) | (i == j)[None]
    blocks = [torch.einsum("bihd,bjhd->bhij", q.to(ctype), up(k)) * scale]
    weigh = [lambda p: torch.einsum("bhij,bjhd->bihd", p, up(v))]
    masks = [ctx_mask]
    if k_fade is not None:
        fade_mask = ((j <= i - window) & (j > i - 2 * window))[None] & real
        blocks.append(biased(torch.einsum("bihd,bjhd->bhij", q.to(ctype), up(k_fade)) * scale, fading_bias))
        weigh.append(lambda p: torch.einsum("bhij,bjhd->bihd", p, up(v_fade)))
        masks.append(fade_mask)
    if k_self is not None:  # one key per query: its own fading token, at distance 0
        blocks.append(biased(torch.einsum("bihd,bihd->bhi", q.to(ctype), up(k_self))[..., None] * scale, self_bias))
        weigh.append(lambda p: torch.einsum("bhi,bihd->bihd", p[..., 0], up(v_self)))
        masks.append(torch.ones(bsz, length, 1, dtype=torch.bool, device=q.device))
    if memory is not None:
        if chunk_size is None:
            raise ValueError("chunk_size is needed to tell which memory each query sees")
        seen = torch.arange(length, device=q.device) // chunk_size  # query i sees memory[:, i // C]
        mem_k, mem_v = memory.k[:, seen], memory.v[:, seen]  # [B, L, M, Hkv, D]
        em = memory.valid[:, seen] & (memory.pos[:, seen] <= i - window)  # [B, L, M]
        if doc_start is not None:
            em = em & (memory.pos[:, seen] >= doc_start[:, :, None])
        eid = biased(torch.einsum("bihd,bimhd->bhim", q_eid.to(ctype), up(mem_k)) * scale, eidetic_bias)
        if memory.bias is not None:  # per slot (learned selection)
            eid = eid + memory.bias[:, seen].to(ctype)[:, None]
        blocks.append(eid)
        weigh.append(lambda p: torch.einsum("bhim,bimhd->bihd", p, up(mem_v)))
        masks.append(em)
    s = torch.cat([b.masked_fill(~m[:, None], neg) for b, m in zip(blocks, masks)], dim=-1)
    p = torch.softmax(s, dim=-1) * torch.cat(masks, dim=-1)[:, None].to(ctype)  # exact zeros where masked
    out, start = 0, 0
    for block, fn in zip(blocks, weigh):
        width = block.shape[-1]
        out = out + fn(p[..., start : start + width])
        start += width
    return out[:, first:end].to(q.dtype)
