"""Dense masked reference of B'MOJO attention: the truth the chunked and recurrent forms are tested against.

Query ``i`` attends three key sets under one joint softmax:

* in-context: tokens ``j`` in ``[i-W+1, i]`` (keys ``k``, values ``v``);
* fading: the SSM's fading tokens ``j`` in ``[i-2W+1, i-W]`` (keys ``k_fade``, values ``v_fade``);
* eidetic: tokens ``j`` with ``eid_mask[b, i, j]`` (scores ``q_eid . k_eid``, values ``v``).

Cost and memory are O(L^2); use it for tests only.
"""

from __future__ import annotations

import torch


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, Hkv, D]`` -> ``[B, L, H, D]``: query head ``h`` reads key/value head ``h // (H // Hkv)``."""
    return x.repeat_interleave(num_heads // x.shape[2], dim=2)


def bmojo_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    k_fade: torch.Tensor | None = None,
    v_fade: torch.Tensor | None = None,
    q_eid: torch.Tensor | None = None,
    k_eid: torch.Tensor | None = None,
    eid_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense B'MOJO attention.

    Args:
        q: ``[B, L, H, D]`` queries (rotary already applied).
        k, v: ``[B, L, Hkv, D]`` in-context keys (rotary applied) and values.
        window: ``W``.
        k_fade, v_fade: ``[B, L, Hkv, D]`` keys/values of the fading tokens, or ``None`` (no fading memory).
        q_eid, k_eid: ``[B, L, H, D]`` / ``[B, L, Hkv, D]`` queries and keys used for eidetic scores.
        eid_mask: ``[B, L, L]`` bool, ``True`` where query ``i`` sees token ``j`` through the eidetic memory
            (callers guarantee ``j <= i - W``), or ``None`` (no eidetic memory).
        key_mask: ``[B, L]`` bool, ``False`` at padding keys. A query always sees itself, so no row is empty.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, L, H, D]`` in ``q.dtype``; computed in float32 (float64 for float64 inputs).
    """
    bsz, length, num_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    ctype = torch.float64 if q.dtype == torch.float64 else torch.float32
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    real = torch.ones(bsz, 1, length, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        real = key_mask[:, None, :].bool()

    def scores(qq, kk):
        return torch.einsum("bihd,bjhd->bhij", qq.to(ctype), _expand_kv(kk, num_heads).to(ctype)) * scale

    neg = torch.finfo(ctype).min
    ctx_mask = (((j <= i) & (j > i - window))[None] & real) | (i == j)[None]
    blocks = [scores(q, k).masked_fill(~ctx_mask[:, None], neg)]
    values = [v]
    masks = [ctx_mask]
    if k_fade is not None:
        fade_mask = ((j <= i - window) & (j > i - 2 * window))[None] & real
        blocks.append(scores(q, k_fade).masked_fill(~fade_mask[:, None], neg))
        values.append(v_fade)
        masks.append(fade_mask)
    if eid_mask is not None:
        em = eid_mask.bool() & real
        blocks.append(scores(q_eid, k_eid).masked_fill(~em[:, None], neg))
        values.append(v)
        masks.append(em)
    s = torch.cat(blocks, dim=-1)
    p = torch.softmax(s, dim=-1) * torch.cat(masks, dim=-1)[:, None].to(ctype)  # exact zeros where masked
    out = 0
    for n, val in enumerate(values):
        out = out + torch.einsum("bhij,bjhd->bihd", p[..., n * length : (n + 1) * length], _expand_kv(val, num_heads).to(ctype))
    return out.to(q.dtype)
