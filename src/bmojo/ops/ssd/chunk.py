"""Chunked SSD: closed form inside each chunk, a linear scan over chunk states.

The sequence is cut into chunks of length l = chunk_size (c = ceil(L / l) chunks). Writing
a_t = dt_t * A_h <= 0 and seg(i, j) = a_{j+1} + ... + a_i (i >= j), the recurrence of
``ssd_ref`` unrolls inside one chunk to

    y_i = sum_{j <= i} (C_i . B_j) exp(seg(i, j)) dt_j x_j        (intra-chunk, "diagonal")
        + exp(a_0 + ... + a_i) * (S_in @ C_i)                      (carried-in state)

    S_out = exp(a_0 + ... + a_{l-1}) S_in + sum_j exp(seg(l-1, j)) dt_j outer(x_j, B_j)

so the only sequential part is S_in -> S_out, one step per chunk (cost linear in L).
All exponents are sums of a_t's, hence <= 0: exp never overflows.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import autocast_off, compute_dtype, custom_backward_applies


def segsum(a: Tensor) -> Tensor:
    """Stable segment sums over the last dim.

    Args:
        a: [..., l]
    Returns:
        [..., l, l] with out[..., i, j] = a[j+1] + ... + a[i] for i >= j (0 on the diagonal)
        and -inf for j > i, so that exp(out) is the causal decay matrix.

    Computed as a masked prefix sum rather than cumsum(a)[i] - cumsum(a)[j]: each entry is a
    plain sum of same-sign terms, so there is no cancellation and the result keeps the
    sign of a (<= 0 for decays). The prefix sum is a matmul with a lower-triangular matrix
    of ones, not ``torch.cumsum``: cumsum lowers to an HLO ``reduce-window``, which neuronx-cc
    handles badly (``xla_audit.FORBIDDEN_OPCODES``); the matmul runs on TensorE.
    """
    l = a.shape[-1]
    ones = torch.ones(l, l, dtype=torch.bool, device=a.device)
    strict_lower = torch.tril(ones, diagonal=-1)  # [k, j]: k > j
    # m[..., k, j] = a[k] if k > j else 0; summing over k <= i gives sum_{j < k <= i} a[k].
    m = a[..., :, None].expand(*a.shape, l).masked_fill(~strict_lower, 0.0)
    with autocast_off(a.device):  # decay exponents in a's precision, also under bf16 autocast
        out = torch.matmul(torch.tril(ones).to(a.dtype), m)  # [i, k] @ [..., k, j]
    # masked_fill (not multiply) so the -inf never meets a 0 and no NaN reaches autograd.
    return out.masked_fill(~torch.tril(ones), float("-inf"))


def decay_exp(x: Tensor) -> Tensor:
    """``torch.exp(x)`` for decay exponents ``x <= 0`` (``-inf`` allowed; float32 or float64, the SSD's compute
    dtypes), with results below ``e^2`` times the dtype's smallest normal number flushed to exactly 0 (``e^-85.3`` in
    float32, ``e^-706.4`` in float64: far below anything a decay contributes next to the terms it is added to); NaN
    stays NaN. On a CPU ``torch.exp`` leaves its vectorised path when a result underflows: measured ~100x slower per
    element for float32 inputs below ``log(tiny) = -87.34`` and ~15x for ``-inf``, and half of every chunk's
    segment-sum matrix is ``-inf``. Inputs are raised to the bound before the ``exp`` and the flushed entries set to 0
    after (a fixed-shape ``where``; their gradient is 0 instead of a subnormal one).

    Raises:
        ValueError: ``x`` neither float32 nor float64 (in half precision the bound would flush decays that matter).
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"decay_exp computes in float32 or float64, got {x.dtype}")
    if custom_backward_applies(x):
        return _DecayExp.apply(x)
    return _flushed_exp(x)


def _flushed_exp(x: Tensor) -> Tensor:
    # Bounds as tensors in x's dtype: a Python float would enter an XLA graph as an f64 scalar.
    floor = torch.tensor(math.log(torch.finfo(x.dtype).tiny) + 2.0, dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(x < floor, zero, torch.exp(x.clamp(min=floor)))


class _DecayExp(torch.autograd.Function):
    """``_flushed_exp`` saving only its result, as ``exp`` does: the gradient is ``grad * y`` (0 where flushed).
    Autograd through the ``where`` and the clamp would also keep their inputs and masks for every chunk."""

    @staticmethod
    def forward(ctx, x):
        y = _flushed_exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y


def segsum_ref(a: Tensor) -> Tensor:
    """Plain double-loop version of ``segsum`` (for tests). a: [..., l] -> [..., l, l]."""
    l = a.shape[-1]
    out = torch.full((*a.shape, l), float("-inf"), dtype=a.dtype, device=a.device)
    for i in range(l):
        for j in range(i + 1):
            out[..., i, j] = a[..., j + 1 : i + 1].sum(-1)
    return out


# Long on purpose: the chunked SSD as one listing (as mamba's ssd_minimal): intra-chunk, states, inter-chunk.
def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: Optional[int] = 64,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Chunked SSD, same semantics as ``ssd_ref`` (see ``naive.py``).

    Args:
        x:  [b, L, H, P]
        dt: [b, L, H]   positive step sizes (0 = identity step)
        A:  [H]         negative decay rates
        B:  [b, L, G, N]
        C:  [b, L, G, N]
        chunk_size: l, any positive int; L need not be a multiple of it
        D:  [H] or None skip connection
        initial_state: [b, H, P, N] or None (zeros)

    Returns:
        y:           [b, L, H, P] in x.dtype
        final_state: [b, H, P, N] in float32 (float64 if inputs are float64)

    Shapes of all intermediates depend only on input shapes (no data-dependent control
    flow); the Python loop runs ceil(L / chunk_size) times.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2], B.shape[-1]
    assert nheads % ngroups == 0, f"nheads={nheads} not divisible by ngroups={ngroups}"
    assert chunk_size > 0
    assert dt.shape == (batch, seqlen, nheads) and A.shape == (nheads,)
    assert B.shape == C.shape == (batch, seqlen, ngroups, dstate)
    rep = nheads // ngroups
    dtype = compute_dtype(x, dt, A, B, C, D, initial_state)

    # Decay math in fp32/fp64 whatever the input precision.
    xf, dtf, Af = x.to(dtype), dt.to(dtype), A.to(dtype)
    Bf, Cf = B.to(dtype), C.to(dtype)

    # Pad to whole chunks with dt = 0, x = 0 (and B = C = 0): identity steps for the state.
    pad = (-seqlen) % chunk_size
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size
    l = chunk_size

    # Chunked views; heads split as (group, head-in-group) so B/C are shared without copies.
    xc = xf.reshape(batch, nchunks, l, ngroups, rep, headdim)     # [b, c, l, G, R, P]
    Bc = Bf.reshape(batch, nchunks, l, ngroups, dstate)           # [b, c, l, G, N]
    Cc = Cf.reshape(batch, nchunks, l, ngroups, dstate)
    dtc = dtf.reshape(batch, nchunks, l, ngroups, rep)            # [b, c, l, G, R]
    a = (dtc * Af.view(ngroups, rep)).permute(0, 1, 3, 4, 2)      # [b, c, G, R, l], <= 0

    # Decay from chunk start to i: a prefix sum as a matmul with upper-triangular ones (no cumsum, see segsum).
    with autocast_off(a.device):  # in fp32/fp64 also under bf16 autocast
        a_cum = a @ torch.ones(l, l, dtype=dtype, device=a.device).triu()  # [b, c, G, R, l]
    decay = decay_exp(segsum(a))                                   # [b, c, G, R, l(i), l(j)]
    dt_j = dtc.permute(0, 1, 3, 4, 2)[..., None, :]               # [b, c, G, R, 1, l(j)]

    # 1) Intra-chunk output: (C_i . B_j) * exp(seg(i, j)) * dt_j, applied to x_j.
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)               # [b, c, G, l, l]
    scores = CB[:, :, :, None] * decay * dt_j                     # [b, c, G, R, l, l]
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, xc)         # [b, c, l, G, R, P]

    # 2) State produced by each chunk from its own inputs (zero initial state). The decay
    #    from j to the chunk end is the last row of the segsum matrix (already <= 0).
    w = decay[..., -1, :] * dt_j[..., 0, :]                       # [b, c, G, R, l(j)]
    chunk_states = torch.einsum("bcgrj,bcjgrp,bcjgn->bcgrpn", w, xc, Bc)  # [b, c, G, R, P, N]

    # 3) Pass states across chunks: one step per chunk, linear in the number of chunks.
    chunk_decay = decay_exp(a_cum[..., -1])                        # [b, c, G, R]
    if initial_state is None:
        state = xf.new_zeros(batch, ngroups, rep, headdim, dstate)
    else:
        state = initial_state.to(dtype).reshape(batch, ngroups, rep, headdim, dstate)
    # Iterate over unbind(1) views, not chunk_decay[:, c]: the backward of each indexing op materialises a zero
    # tensor of the whole input, which made the backward quadratic in L (tests/test_ssd_speed.py).
    states_in = []
    for decay_c, new_c in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        states_in.append(state)
        state = decay_c[..., None, None] * state + new_c
    states_in = torch.stack(states_in, dim=1)                     # [b, c, G, R, P, N]

    # 4) Contribution of the carried-in state to each position: exp(a_0 + ... + a_i) S_in C_i.
    y_state = torch.einsum("bcign,bcgrpn->bcigrp", Cc, states_in)
    y = y + y_state * decay_exp(a_cum).permute(0, 1, 4, 2, 3)[..., None]

    y = y.reshape(batch, nchunks * l, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + D.to(dtype)[:, None] * xf[:, :seqlen]
    final_state = state.reshape(batch, nheads, headdim, dstate)
    return y.to(x.dtype), final_state
