"""Causal depthwise conv, reference form: a Python loop over time (for tests). Notation in ``chunk.py``."""


from typing import Optional

import torch
from torch import Tensor


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, initial_state: Optional[Tensor] = None
) -> Tensor:
    """Python loop over time, for tests. Same signature and result as ``causal_conv1d``."""
    batch, seqlen, dim = x.shape
    K = weight.shape[1]
    prev = x.new_zeros(batch, K - 1, dim) if initial_state is None else initial_state.transpose(1, 2)
    xp = torch.cat([prev.to(x.dtype), x], dim=1)  # [b, K-1+L, D]
    ys = []
    for t in range(seqlen):
        acc = torch.zeros_like(x[:, 0])
        for k in range(K):
            acc = acc + weight[:, k] * xp[:, t + k]
        ys.append(acc if bias is None else acc + bias)
    return torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, dim)
