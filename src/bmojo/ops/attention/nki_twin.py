"""Algorithm twin of the joint B'MOJO attention NKI kernels (``nki.py``; docs/kernels.md): one online softmax
per 128-query tile over the window key tiles, the fading key tiles and one eidetic tile, emitting the output and
the log-sum-exp; a backward that recomputes the probabilities from the lse.

Everything data-dependent stays outside, in XLA (``kernel_inputs``): keys are padded in front (W for the window,
2W for the fading keys) so that chunk ``c``'s key tile ``t`` is block ``c + t``; the band masks are static additive
tiles, one per tile offset; front padding is an additive key bias; eidetic validity and visibility
(``valid & pos <= i - W``) is an additive ``[C, M]`` bias tile per chunk. Masked entries get ``NEG`` (finite, so a
tile that is fully masked so far cannot produce NaN; the query's own key is always visible, so every row ends with a
real maximum and the masked terms become exact zeros).

Scope (what ``nki_backend.supports_attention_nki`` requires): chunk = tile = 128 in the kernel (any C here),
L and W multiples of C, no key padding mask. Layouts: q/qe [b,H,L,D] pre-scaled; kw/vw [b,H,W+L,D]; kf/vf [b,H,2W+L,D];
mk/mv [b,H,nC,M,D]; ebias [b,1,nC,C,M]. fp32 accumulation; ``mm_dtype`` rounds every matmul operand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import expand_groups

NEG = -30000.0


def _mm(a: Tensor, b: Tensor, mm_dtype=None) -> Tensor:
    if mm_dtype is not None:
        a, b = a.to(mm_dtype).float(), b.to(mm_dtype).float()
    return a @ b


def band_bias(window: int, chunk: int, lo: int, device=None) -> Tensor:
    """[T, C, C] additive tiles (0 or NEG), T = (W + C) / C: in key tile t, query qi sees key kj iff
    ``rel = i - j = lo + W - tC + qi - kj`` lies in ``[lo, lo + W)``; ``lo = 0`` (window) or ``W`` (fading)."""
    tiles = (window + chunk) // chunk
    t = torch.arange(tiles, device=device)[:, None, None]
    qi = torch.arange(chunk, device=device)[None, :, None]
    kj = torch.arange(chunk, device=device)[None, None, :]
    rel = lo + window - t * chunk + qi - kj
    visible = (rel >= lo) & (rel < lo + window)
    return torch.where(visible, 0.0, NEG)


def _blocks(x: Tensor, chunk: int) -> Tensor:
    return x.unflatten(2, (x.shape[2] // chunk, chunk))  # [b,H,n,C,D]


def _tiles(t: dict):
    """Yield (name, tile index, bias [.., nC, C, K], keys [b,H,nC,K,D], values) for every key set, in the kernel's
    order: window tiles, fading tiles, the eidetic tile."""
    c, w, n = t["chunk"], t["window"], t["q"].shape[2] // t["chunk"]
    for name, pad, lo in (("w", w, 0), ("f", 2 * w, w)):
        if t.get("k" + name) is None:
            continue
        keys, vals = _blocks(t["k" + name], c), _blocks(t["v" + name], c)
        kbias = torch.where(torch.arange(keys.shape[2] * c, device=keys.device) < pad, NEG, 0.0)
        kbias = kbias.view(-1, c)  # [blocks, C]
        band = band_bias(w, c, lo, keys.device)
        for i in range((w + c) // c):  # padded by W (2W): chunk c's key tile i is block c + i in both sets
            bias = band[i] + kbias[i : i + n, None, :]  # [nC, C, C]
            yield name, i, bias, keys[:, :, i : i + n], vals[:, :, i : i + n]
    if t.get("mk") is not None:
        yield "m", 0, t["ebias"], t["mk"], t["mv"]


def attention_twin_fwd(t: dict, mm_dtype=None):
    """(o [b,H,L,D] fp32, lse [b,H,L] fp32)."""
    c = t["chunk"]
    q = _blocks(t["q"].float(), c)  # [b,H,nC,C,D]
    qe = _blocks(t["qe"].float(), c) if t.get("mk") is not None else None
    m = torch.full(q.shape[:-1] + (1,), NEG, device=q.device)
    l, o = torch.zeros_like(m), torch.zeros_like(q)
    for name, _, bias, keys, vals in _tiles(t):
        s = _mm(qe if name == "m" else q, keys.transpose(-1, -2), mm_dtype) + bias
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        o = o * alpha + _mm(p, vals, mm_dtype)
        m = m_new
    return (o / l).flatten(2, 3), (m + torch.log(l)).flatten(2, 4)


def attention_twin_bwd(t: dict, o: Tensor, lse: Tensor, do: Tensor, mm_dtype=None) -> dict:
    """Gradients of the differentiable inputs in ``t`` (q, qe, kw, vw, kf, vf, mk, mv), recomputing p from lse."""
    c = t["chunk"]
    mm = lambda a, b: _mm(a, b, mm_dtype)  # noqa: E731
    q, do_b = _blocks(t["q"].float(), c), _blocks(do.float(), c)
    qe = _blocks(t["qe"].float(), c) if t.get("mk") is not None else None
    lse_b = lse.unflatten(2, (q.shape[2], c))[..., None]
    delta = (_blocks(o, c) * do_b).sum(-1, keepdim=True)
    grads = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in t.items()
             if k in ("q", "qe", "kw", "vw", "kf", "vf", "mk", "mv") and v is not None}
    dq, dqe = torch.zeros_like(q), torch.zeros_like(q)
    n = q.shape[2]
    for name, i, bias, keys, vals in _tiles(t):
        query = qe if name == "m" else q
        p = torch.exp(mm(query, keys.transpose(-1, -2)) + bias - lse_b)
        ds = p * (mm(do_b, vals.transpose(-1, -2)) - delta)
        (dqe if name == "m" else dq).add_(mm(ds, keys))
        dk, dv = mm(ds.transpose(-1, -2), query), mm(p.transpose(-1, -2), do_b)
        if name == "m":
            grads["mk"], grads["mv"] = dk, dv
            continue
        for key, d in (("k" + name, dk), ("v" + name, dv)):
            blocks = _blocks(grads[key], c)  # a view: adds land in grads[key]
            blocks[:, :, i : i + n] += d
    grads["q"] = dq.flatten(2, 3)
    if "qe" in grads:
        grads["qe"] = dqe.flatten(2, 3)
    return grads


_ORDER = ("q", "qe", "kw", "vw", "kf", "vf", "mk", "mv")


class AttentionCore(torch.autograd.Function):
    """The layout contract of the planned kernel pair: differentiable ``_ORDER`` tensors in, ``o`` out."""

    @staticmethod
    def forward(ctx, static, *tensors):
        t = {**static, **dict(zip(_ORDER, tensors))}
        o, lse = attention_twin_fwd(t, static.get("mm_dtype"))
        ctx.static, ctx.present = static, [x is not None for x in tensors]
        ctx.save_for_backward(*[x for x in tensors if x is not None], o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        *saved, o, lse = ctx.saved_tensors
        it = iter(saved)
        tensors = [next(it) if present else None for present in ctx.present]
        t = {**ctx.static, **dict(zip(_ORDER, tensors))}
        grads = attention_twin_bwd(t, o, lse, do, ctx.static.get("mm_dtype"))
        return (None, *(grads.get(k) if x is not None else None for k, x in zip(_ORDER, tensors)))


def kernel_inputs(q, k, v, window, chunk_size, k_fade=None, v_fade=None, q_eid=None, memory=None, scale=None):
    """The differentiable kernel-layout tensors (see the module docstring) and the static ones."""
    heads, d = q.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    length, w, c = q.shape[1], window, chunk_size

    def kv(x, pad):
        return F.pad(expand_groups(x.float(), heads).transpose(1, 2), (0, 0, pad, 0))

    t = {"q": (q.float() * scale).transpose(1, 2), "kw": kv(k, w), "vw": kv(v, w), "qe": None, "kf": None,
         "vf": None, "mk": None, "mv": None}
    if k_fade is not None:
        t["kf"], t["vf"] = kv(k_fade, 2 * w), kv(v_fade, 2 * w)
    static = {"chunk": c, "window": w}
    if memory is not None:
        t["qe"] = (q_eid.float() * scale).transpose(1, 2)
        t["mk"], t["mv"] = (expand_groups(x.float(), heads).permute(0, 3, 1, 2, 4) for x in (memory.k, memory.v))
        qpos = torch.arange(length, device=q.device).view(-1, c)  # [nC, C]
        seen = memory.valid[:, :, None, :] & (memory.pos[:, :, None, :] <= qpos[None, :, :, None] - w)
        static["ebias"] = torch.where(seen, 0.0, NEG)[:, None]  # [b, 1, nC, C, M]
    return static, t


def bmojo_attention_twin(q, k, v, window, chunk_size, k_fade=None, v_fade=None, q_eid=None, memory=None,
                         key_mask=None, scale=None, mm_dtype=None):
    """The twin behind the signature of ``bmojo_attention_chunked`` (``key_mask`` must be None; ``mm_dtype``
    rounds every matmul operand, forward and backward)."""
    if key_mask is not None:
        raise ValueError("the attention kernel takes no key padding mask")
    static, t = kernel_inputs(q, k, v, window, chunk_size, k_fade, v_fade, q_eid, memory, scale)
    static["mm_dtype"] = mm_dtype
    o = AttentionCore.apply(static, *(t[name] for name in _ORDER))
    return o.transpose(1, 2).to(q.dtype)


def kernel_arrays(static: dict, t: dict) -> list[Tensor]:
    """The HBM arguments of ``nki.attn_fwd_kernel`` (fp32, detached), from ``kernel_inputs``; needs fading keys
    and a memory (an all-invalid memory stands for none)."""
    w, c = static["window"], static["chunk"]
    dev = t["q"].device
    length = t["q"].shape[2]

    def key_bias(pad):
        return torch.where(torch.arange(pad + length, device=dev) < pad, NEG, 0.0)[None]

    return [x.detach().float().contiguous() for x in (
        t["q"], t["qe"], t["kw"], t["vw"], t["kf"], t["vf"], t["mk"].flatten(2, 3), t["mv"].flatten(2, 3),
        band_bias(w, c, 0, dev), band_bias(w, c, w, dev), key_bias(w), key_bias(2 * w),
        static["ebias"][:, 0].flatten(1, 2))]
