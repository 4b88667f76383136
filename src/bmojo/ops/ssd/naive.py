"""Reference (slow, obviously correct) Mamba-2 SSD with a scalar decay per head.

Notation used throughout ``bmojo.ops.ssd``:

    batch  b     sequence length  L     heads       H     head dim   P
    groups G     state dim        N     (H % G == 0; head h reads B/C group h // (H // G))

Per head h and time step t (dt_t > 0 already, i.e. softplus applied by the caller):

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, B_t)      # [P, N]
    y_t     = state_t @ C_t  (+ D_h * x_t)                                  # [P]

A step with dt_t == 0 (and x_t == 0) leaves the state unchanged; padding relies on this.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common import compute_dtype, expand_groups


def ssd_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: Optional[int] = None,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Sequential SSD scan, one Python iteration per time step; the signature of ``ssd_chunked``.

    Args:
        x:  [b, L, H, P]
        dt: [b, L, H]   positive step sizes (0 = identity step)
        A:  [H]         negative decay rates
        B:  [b, L, G, N]
        C:  [b, L, G, N]
        chunk_size: accepted for the common signature and ignored (the scan has no chunks)
        D:  [H] or None skip connection
        initial_state: [b, H, P, N] or None (zeros)

    Returns:
        y:           [b, L, H, P] in x.dtype
        final_state: [b, H, P, N] in float32 (float64 if inputs are float64)
    """
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    dtype = compute_dtype(x, dt, A, B, C, D, initial_state)

    xf, dtf, Af = x.to(dtype), dt.to(dtype), A.to(dtype)
    Bh = expand_groups(B.to(dtype), nheads)  # [b, L, H, N]
    Ch = expand_groups(C.to(dtype), nheads)

    if initial_state is None:
        state = x.new_zeros(batch, nheads, headdim, dstate, dtype=dtype)
    else:
        state = initial_state.to(dtype)

    ys = []
    for t in range(seqlen):
        decay = torch.exp(dtf[:, t] * Af)  # [b, H]
        dBx = (dtf[:, t, :, None, None] * xf[:, t, :, :, None]) * Bh[:, t, :, None, :]  # [b, H, P, N]
        state = decay[:, :, None, None] * state + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, nheads, headdim)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xf
    return y.to(x.dtype), state
