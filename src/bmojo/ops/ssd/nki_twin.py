"""Algorithm twin of the SSD NKI kernels (``nki.py``): the same chunk loop, tiles, TensorE products, fp32
accumulation and backward recomputation, written in PyTorch and batched over the kernel's grid ``[b, H]``.

It is the specification the kernel source follows step by step (each helper here has a namesake there), it is
checked against ``ssd_ref`` and autograd in tests/test_nki_ssd.py, and it is the torch stand-in that takes the
kernel's place in ``nki_backend.SSDCore`` off Neuron. Layouts (see ``nki.py``): u [b,H,L,P], a [b,H,L,1],
bm/cm [b,H,L,N], s0 [b,H,N,P]; L a multiple of 128. ``mm_dtype=torch.bfloat16`` rounds the operands of every
data matmul to bf16 (products accumulate in fp32, as in PSUM); the decay matmuls (cumulative sums of ``a``)
stay fp32 in both modes.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 128


def _mm(stationary: Tensor, moving: Tensor, mm_dtype: torch.dtype | None = None) -> Tensor:
    """``nc_matmul``: [..., K, M]^T @ [..., K, N] -> [..., M, N] fp32, operands optionally rounded."""
    if mm_dtype is not None:
        stationary, moving = stationary.to(mm_dtype).float(), moving.to(mm_dtype).float()
    return stationary.transpose(-1, -2) @ moving


def triangle(device=None) -> Tensor:
    """The kernel's ``tri`` input: [128, 128] fp32, tri[k, i] = 1 if k <= i."""
    return torch.triu(torch.ones(CHUNK, CHUNK, device=device))


def _decays(a_c: Tensor, upper: Tensor):
    """Same outputs as ``nki._decays``: cs, lt[j,i], e, w, big (all [..., l, 1] except lt [..., l, l])."""
    ones = torch.ones_like(upper)
    cs = _mm(upper, a_c)
    cs_rows = _mm(ones * a_c, upper)  # [j, i] = cs[i]
    seg = (cs_rows - cs) * upper
    lt = torch.exp(seg) * upper
    last = _mm(ones, a_c)
    return cs, lt, torch.exp(cs), torch.exp(last - cs), torch.exp(last)


def _chunks(t: Tensor) -> list[Tensor]:
    return list(t.split(CHUNK, dim=-2))


def ssd_twin_fwd(u, a, bm, cm, s0, mm_dtype=None):
    """Forward: (y [b,H,L,P] fp32, s_final [b,H,N,P] fp32)."""
    upper = triangle(u.device)
    state, ys = s0.float(), []
    for u_c, a_c, b_c, c_c in zip(*map(_chunks, (u.float(), a.float(), bm.float(), cm.float()))):
        _cs, lt, e, w, big = _decays(a_c, upper)
        wt = _mm(b_c.transpose(-1, -2), c_c.transpose(-1, -2), mm_dtype) * lt
        ys.append(_mm(wt, u_c, mm_dtype) + _mm((c_c * e).transpose(-1, -2), state, mm_dtype))
        state = state * big[..., : state.shape[-2], :] + _mm(b_c * w, u_c, mm_dtype)
    return torch.cat(ys, dim=-2), state


def _bwd_chunk(u_c, a_c, b_c, c_c, dy_c, s_in, dstate, upper, mm_dtype):
    """Same steps as ``nki._bwd_chunk``; returns (du, da, db, dc, dS at the chunk start)."""
    ns = b_c.shape[-1]
    mm = lambda s, m: _mm(s, m, mm_dtype)
    _cs, lt, e, w, big = _decays(a_c, upper)
    wt = mm(b_c.transpose(-1, -2), c_c.transpose(-1, -2)) * lt
    c_e, b_w = c_c * e, b_c * w
    u_t, dy_t = u_c.transpose(-1, -2), dy_c.transpose(-1, -2)
    du = mm(wt.transpose(-1, -2), dy_c) + mm(b_w.transpose(-1, -2), dstate)
    dwt = mm(u_t, dy_t)
    dgt, dmt = dwt * lt, dwt * wt
    d_ce = mm(dy_t, s_in.transpose(-1, -2))
    dc = mm(dgt, b_c) + d_ce * e
    d_bw = mm(u_t, dstate.transpose(-1, -2))
    db = mm(dgt.transpose(-1, -2), c_c) + d_bw * w
    col = _mm(dmt, torch.ones_like(a_c))
    row = dmt.sum(-1, keepdim=True)
    de = (d_ce * c_c).sum(-1, keepdim=True) * e
    dw = (d_bw * b_c).sum(-1, keepdim=True) * w
    dcs = (col - row) + (de - dw)
    d_big = (dstate * s_in).sum(-1, keepdim=True) * big[..., :ns, :]
    ones = torch.ones_like(upper)
    da = _mm(upper.transpose(-1, -2), dcs) + _mm(ones, dw) + _mm(ones[:ns], d_big)
    dstate = dstate * big[..., :ns, :] + mm(c_e, dy_c)
    return du, da, db, dc, dstate


def ssd_twin_bwd(u, a, bm, cm, s0, dy, ds, mm_dtype=None):
    """Backward: (du, da, db, dc, ds0), fp32, in the layouts of (u, a, bm, cm, s0).

    Pass 1 recomputes each chunk's incoming state; pass 2 walks the chunks in reverse carrying dS.
    """
    upper = triangle(u.device)
    us, as_, bs, cs_, dys = map(_chunks, (u.float(), a.float(), bm.float(), cm.float(), dy.float()))
    state, states = s0.float(), []
    for u_c, a_c, b_c in zip(us, as_, bs):
        states.append(state)
        _, _, _, w, big = _decays(a_c, upper)
        state = state * big[..., : state.shape[-2], :] + _mm(b_c * w, u_c, mm_dtype)
    dstate, grads = ds.float(), []
    for ic in reversed(range(len(us))):
        *g, dstate = _bwd_chunk(us[ic], as_[ic], bs[ic], cs_[ic], dys[ic], states[ic], dstate, upper, mm_dtype)
        grads.append(g)
    du, da, db, dc = (torch.cat(list(reversed(parts)), dim=-2) for parts in zip(*grads))
    return du, da, db, dc, dstate
