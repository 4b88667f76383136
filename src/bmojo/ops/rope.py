"""Rotary position embeddings (rotate-half convention, as in Llama)."""

from __future__ import annotations

import torch

from .common import cast, compute_dtype


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles for ``positions`` (any integer shape ``[...]``) -> ``cos, sin [..., head_dim // 2]`` in ``dtype``
    (at least float32: angles of large positions need the precision)."""
    dtype = compute_dtype(dtype)
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim
    angles = positions.to(dtype)[..., None] * (1.0 / theta**exponents)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, L, H, D]`` by ``cos, sin [B or 1, L, D/2]`` (broadcast over heads); returns ``x.dtype``."""
    return rotate(x, cos[..., None, :], sin[..., None, :])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with ``cos, sin`` already broadcastable against ``x [..., D]``'s halves ``[..., D/2]`` (one
    decoding step: ``x [B, H, D]`` against ``[B, 1, D/2]``); returns ``x.dtype``."""
    x1, x2 = cast(x, cos.dtype).chunk(2, dim=-1)
    return cast(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1), x.dtype)
