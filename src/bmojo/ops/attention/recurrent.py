"""B'MOJO attention for one decoding step over a fixed-size state (a ring buffer of recent keys and values, and
the eidetic memory). Same masks and softmax as ``chunk.bmojo_attention_chunked`` at one query position."""

from __future__ import annotations

import torch

from ..common import compute_dtype
from ..selection.common import EideticMemory
from .common import joint_softmax


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

    Returns:
        ``[B, H, D]`` in ``q.dtype``.
    """
    bsz, num_heads, head_dim = q.shape
    num_kv = ring_k.shape[2]
    groups = num_heads // num_kv
    scale = head_dim**-0.5 if scale is None else scale
    ctype = compute_dtype(q)

    def score(qq, kk):  # qq [B,H,D], kk [B,K,Hkv,D] -> [B,Hkv,G,K]
        return torch.einsum("bagd,bkad->bagk", qq.view(bsz, num_kv, groups, head_dim).to(ctype), kk.to(ctype)) * scale

    def weighted(vv):
        return lambda p: torch.einsum("bagk,bkad->bagd", p, vv.to(ctype))

    def biased(sc, bias):  # sc [B, Hkv, G, K] + bias [H] per head
        return sc if bias is None else sc + bias.to(ctype).view(1, num_kv, groups, 1)

    rel = positions[:, None] - ring_pos  # [B, R]
    filled = ring_pos >= 0
    scores = [score(q, ring_k)]
    masks = [(filled & (rel >= 0) & (rel < window))[:, None, None]]
    values = [weighted(ring_v)]
    if ring_k_fade is not None:
        scores.append(biased(score(q, ring_k_fade), fading_bias))
        masks.append((filled & (rel >= window) & (rel < 2 * window))[:, None, None])
        values.append(weighted(ring_v_fade))
    if k_self is not None:  # the query's own fading token, at distance 0: always visible
        scores.append(biased(score(q, k_self[:, None]), self_bias))
        masks.append(torch.ones(bsz, 1, 1, 1, dtype=torch.bool, device=q.device))
        values.append(weighted(v_self[:, None]))
    if memory is not None:
        mem_k, mem_v, mem_pos, mem_valid = memory.k, memory.v, memory.pos, memory.valid
        eid = biased(score(q_eid, mem_k), eidetic_bias)
        if memory.bias is not None:  # per slot [B, M] (learned selection)
            eid = eid + memory.bias.to(ctype)[:, None, None, :]
        scores.append(eid)
        masks.append((mem_valid & (mem_pos <= positions[:, None] - window))[:, None, None])
        values.append(weighted(mem_v))
    out = joint_softmax(scores, masks, values, q.dtype)
    return out.reshape(bsz, num_heads, head_dim)
