"""Recurrent SSD: the single-token update for decoding (same math as ``ssd_ref`` for one step), and the whole
sequence as a loop of those steps (``ssd_recurrent``, the signature of ``ssd_ref`` / ``ssd_chunked``)."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common import cast, compute_dtype, expand_groups


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Advance the SSD state by one token.

    Args:
        state: [b, H, P, N] state after the previous token
        x:     [b, H, P]
        dt:    [b, H]   positive step size (0 = identity step)
        A:     [H]      negative decay rates
        B, C:  [b, G, N]
        D:     [H] or None

    Returns:
        y:         [b, H, P] in x.dtype
        new_state: [b, H, P, N] float32 (float64 if inputs are float64), a new tensor;
                   ``state`` is not modified (the caller copies it into its cache).
    """
    batch, nheads, headdim = x.shape
    dtype = compute_dtype(state, x, dt, A, B, C, D)
    xf, dtf = cast(x, dtype), cast(dt, dtype)
    Bh = expand_groups(cast(B, dtype), nheads)  # [b, H, N]
    Ch = expand_groups(cast(C, dtype), nheads)

    decay = torch.exp(dtf * cast(A, dtype))  # [b, H]
    # Views, not x[:, :, None, None]: one op each (a step is bound by its count of ops).
    dt_cell = dtf.view(batch, nheads, 1, 1)
    dBx = (dt_cell * xf.view(batch, nheads, headdim, 1)) * Bh.view(batch, nheads, 1, -1)  # [b, H, P, N]
    new_state = decay.view(batch, nheads, 1, 1) * cast(state, dtype) + dBx
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + cast(D, dtype).view(nheads, 1) * xf
    return cast(y, x.dtype), new_state


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: Optional[int] = None,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """``ssd_step`` over every position of ``x [b, L, H, P]``; arguments and results as ``ssd_chunked``
    (``chunk_size`` is ignored). What a decoder computes token by token, in one call."""
    batch, seqlen, nheads, headdim = x.shape
    dtype = compute_dtype(x, dt, A, B, C, D, initial_state)
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=dtype) if initial_state is None else initial_state
    ys = []
    for t in range(seqlen):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, nheads, headdim)
    return y, state.to(dtype)
