"""RMSNorm and the gated RMSNorm of Mamba-2."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.common import at_least_fp32, cast


class BMojoRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = at_least_fp32(x)
        return cast(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype) * self.weight


class BMojoGatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z))`` per group of channels, so the result does not depend on how heads are sharded.

    The group size is fixed at construction; the number of groups is read from the weight, so a tensor-parallel
    shard (fewer channels) normalises its own groups."""

    def __init__(self, size: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = size // groups
        self.eps = eps

    @property
    def groups(self) -> int:
        return self.weight.shape[0] // self.group_size

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = (at_least_fp32(y) * F.silu(at_least_fp32(z))).unflatten(-1, (self.groups, -1))
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return cast(x, y.dtype) * self.weight
