"""Causal depthwise conv, one decoding step over the carried window of the last K-1 inputs."""


from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common import cast


def causal_conv1d_step(
    conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """One decoding step.

    Args:
        conv_state: [b, D, K-1] the last K-1 inputs, oldest first
        x:      [b, D] the new input
        weight: [D, K]
        bias:   [D] or None

    Returns:
        y:              [b, D] in x.dtype
        new_conv_state: [b, D, K-1] in conv_state.dtype, a new tensor (input not modified)
    """
    window = torch.cat([cast(conv_state, x.dtype), x.unsqueeze(-1)], dim=-1)  # [b, D, K]
    y = (window * cast(weight, x.dtype)).sum(-1)
    if bias is not None:
        y = y + cast(bias, x.dtype)
    return y, cast(window[..., 1:], conv_state.dtype)
