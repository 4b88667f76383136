"""B'MOJO attention for one decoding step over a fixed-size state (a ring buffer of recent keys and values, and
the eidetic memory). Same masks and softmax as ``chunk.bmojo_attention_chunked`` at one query position."""

from __future__ import annotations

import torch

from ..common import cast, compute_dtype
from ..selection.common import EideticMemory


def bmojo_attention_step(
    q: torch.Tensor,
    positions: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_pos: torch.Tensor,
    window: int,
    ring_k_fade: torch.Tensor | None = None,
    ring_v_fade: torch.Tensor | None = None,
    q_eid: torch.Tensor | None = None,
    memory: EideticMemory | None = None,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    fading_bias: torch.Tensor | None = None,
    self_bias: torch.Tensor | None = None,
    eidetic_bias: torch.Tensor | None = None,
    k_self: torch.Tensor | None = None,
    v_self: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step of B'MOJO attention over a fixed-size state.

    Args:
        q: ``[B, H, D]`` query of the token at ``positions [B]`` (rotary applied).
        ring_k, ring_v: ``[B, R, Hkv, D]`` ring buffer of recent keys/values, ``ring_pos [B, R]`` their positions
            (``-1`` = empty). ``R >= W`` (``R >= 2W`` with fading).
        ring_k_fade, ring_v_fade: ``[B, R, Hkv, D]`` fading keys/values in the same ring, or ``None``.
        q_eid: ``[B, H, D]``; memory: ``EideticMemory`` with ``k, v [B, M, Hkv, D]``, ``pos, score [B, M]``
            (the same type as the chunked form's, for one position); ``memory.bias [B, M]`` (or ``None``) is added
            to the slots' logits.
        fading_bias, self_bias, eidetic_bias: ``[H]`` logit biases per query head, or ``None``.
        k_self, v_self: ``[B, Hkv, D]`` the query's own fading key (rotary applied) and value, or ``None``.
        doc_start: ``[B]`` long, the first position of the query's document, or ``None``: slots before it are
            hidden (``memory_reset_at_document``).

    Returns:
        ``[B, H, D]`` in ``q.dtype``.
    """
    bsz, num_heads, head_dim = q.shape
    num_kv = ring_k.shape[2]
    groups = num_heads // num_kv
    scale = head_dim**-0.5 if scale is None else scale
    ctype = compute_dtype(q)

    # One token's step is per-op-overhead bound: every key set is scored by its own einsum, but masks, softmax and
    # the masking of the probabilities run once over the concatenated sets (the order of joint_softmax's blocks).
    def score(qq, kk, bias=None):  # qq [B,Hkv,G,D], kk [B,K,Hkv,D] -> [B,Hkv,G,K] (+ bias [H] per head)
        sc = torch.einsum("bagd,bkad->bagk", qq, cast(kk, ctype)) * scale
        return sc if bias is None else sc + cast(bias, ctype).view(1, num_kv, groups, 1)

    def grouped(qq):  # [B, H, D] -> [B, Hkv, G, D]
        return cast(qq, ctype).view(bsz, num_kv, groups, head_dim)

    q_g = grouped(q)
    now = positions[:, None]  # [B, 1]
    # Ring slots by band: 0 = the window [i-W+1, i], 1 = the fading span [i-2W+1, i-W]; empty slots (-1) in none.
    band = torch.div(torch.where(ring_pos >= 0, now - ring_pos, -1), window, rounding_mode="floor")  # [B, R]
    scores, masks, values = [score(q_g, ring_k)], [band == 0], [ring_v]
    if ring_k_fade is not None:
        scores.append(score(q_g, ring_k_fade, fading_bias))
        masks.append(band == 1)
        values.append(ring_v_fade)
    if k_self is not None:  # the query's own fading token, at distance 0: always visible
        scores.append(score(q_g, k_self[:, None], self_bias))
        masks.append(torch.ones(bsz, 1, dtype=torch.bool, device=q.device))
        values.append(v_self[:, None])
    if memory is not None:
        mem_k, mem_v, mem_pos, mem_valid = memory.k, memory.v, memory.pos, memory.valid
        eid = score(grouped(q_eid), mem_k, eidetic_bias)
        if memory.bias is not None:  # per slot [B, M] (learned selection)
            eid = eid + cast(memory.bias, ctype).view(bsz, 1, 1, -1)
        scores.append(eid)
        visible = mem_valid & (mem_pos <= now - window)
        if doc_start is not None:
            visible = visible & (mem_pos >= doc_start[:, None])
        masks.append(visible)
        values.append(mem_v)
    mask = torch.cat(masks, dim=-1).view(bsz, 1, 1, -1)  # [B, 1, 1, K]
    # A tensor fill value in the scores' dtype (a Python float would enter an XLA graph as an f64 scalar); ``full``
    # is one op where ``torch.tensor`` dispatches four.
    neg = torch.full((), torch.finfo(ctype).min, dtype=ctype, device=q.device)
    # Multiplied by the mask so that a fully masked set contributes exact zeros (as in joint_softmax).
    p = torch.softmax(torch.where(mask, torch.cat(scores, dim=-1), neg), dim=-1) * mask
    out, start = None, 0
    for sc, vv in zip(scores, values):
        width = sc.shape[-1]
        part = torch.einsum("bagk,bkad->bagd", p[..., start : start + width], cast(vv, ctype))
        out = part if out is None else out + part
        start += width
    return cast(out, q.dtype).reshape(bsz, num_heads, head_dim)
